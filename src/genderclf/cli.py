"""`genderclf`: one command per pipeline stage (what `dvc.yaml` calls), plus tools.

Each command only parses arguments, loads settings, calls the stage function, writes
files and logs. Known failures print one readable message and exit 1, no traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from genderclf import config as C

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

app = typer.Typer(
    help="Retraining pipeline for a face-image gender classifier. Stages run in order: "
    "download -> validate -> split -> augment -> train -> evaluate -> register "
    "(`dvc repro` runs them; each command here runs one).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
log = logging.getLogger("genderclf")

ParamsOpt = Annotated[
    Path, typer.Option("--params", "-p", help="Settings file (default: params.yaml in the cwd).")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S", stream=sys.stderr,
    )  # fmt: skip
    for noisy in ("great_expectations", "absl", "h5py", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _known_errors() -> tuple[type[BaseException], ...]:
    from genderclf.data.augment import AugmentError
    from genderclf.data.fsutil import UnsafeArchiveError
    from genderclf.data.layouts import LayoutError
    from genderclf.data.sources import DownloadError
    from genderclf.data.split import SplitError
    from genderclf.data.validation import ValidationFailed
    from genderclf.model.backbones import ModelConfigError
    from genderclf.model.evaluate import ModelLoadError
    from genderclf.predict import PredictError
    from genderclf.tracking.setup import TrackingError

    return (C.SettingsError, DownloadError, LayoutError, ValidationFailed, SplitError,
            AugmentError, UnsafeArchiveError, FileNotFoundError, PermissionError,
            ModelConfigError, ModelLoadError, TrackingError, PredictError)  # fmt: skip


def stage(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command: logging set up, known errors shown as one message and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _setup_logging()
        try:
            return fn(*args, **kwargs)
        except _known_errors() as err:
            typer.secho(f"error ({fn.__name__}): {err}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None

    return wrapper


@app.command()
@stage
def download(params: ParamsOpt = C.PARAMS_FILE, quiet: QuietOpt = False) -> None:
    """Fetch the dataset (`data.source`: sample | kaggle | dir | s3) into data/raw/.

    The folder is replaced only when the download is complete; data/raw/SOURCE.json
    records the source, time, file count and a content checksum.
    """
    from genderclf.data.sources import download as run

    settings = C.load_settings(params)
    rec = run(settings, C.RAW_DIR, progress=not quiet)
    typer.echo(f"download: {rec['file_count']} files from {rec['source']} -> {C.RAW_DIR}/ "
               f"({rec['checksum'][:19]}...)")  # fmt: skip


@app.command()
@stage
def validate(params: ParamsOpt = C.PARAMS_FILE, quiet: QuietOpt = False) -> None:
    """Check every image and the label table (Great Expectations); write the manifest.

    Writes data/validated/manifest.csv (usable images) and reports/validation/
    (rejected.csv with a reason per file, GX results JSON, Data Docs HTML). Fails when an
    expectation fails or more than `validate.max_reject_fraction` of the files are rejected.
    """
    from genderclf.data.validation import validate as run

    settings = C.load_settings(params)
    s = run(
        settings,
        C.RAW_DIR,
        C.MANIFEST_FILE,
        C.VALIDATION_REPORT_DIR,
        C.VALIDATION_METRICS,
        progress=not quiet,
    )
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(s["reject_reasons"].items())) or "none"
    typer.echo(
        f"validate: {s['usable']} usable, {s['rejected']} rejected ({reasons}); "
        f"male fraction {s['male_fraction']}; expectations passed. "
        f"Reports: {C.VALIDATION_REPORT_DIR}/"
    )


@app.command()
@stage
def split(params: ParamsOpt = C.PARAMS_FILE) -> None:
    """Split the manifest into data/splits/{train,val,test}.csv (`split.strategy`)."""
    import pandas as pd

    from genderclf.data.split import balance_table, identity_overlap, split_manifest, write_splits

    settings = C.load_settings(params)
    if not C.MANIFEST_FILE.is_file():
        raise FileNotFoundError(f"{C.MANIFEST_FILE} not found: run `dvc repro validate` first")
    manifest = pd.read_csv(C.MANIFEST_FILE, dtype={"identity": str, "partition": str},
                           keep_default_na=False)  # fmt: skip
    parts = split_manifest(manifest, settings.split, settings.base.seed)
    write_splits(parts, C.SPLITS_DIR)
    typer.echo(f"split ({settings.split.strategy}):\n{balance_table(parts)}")
    if (manifest["identity"] != "").any():
        typer.echo(f"identities in more than one split: {identity_overlap(parts)}")


@app.command()
@stage
def augment(params: ParamsOpt = C.PARAMS_FILE, quiet: QuietOpt = False) -> None:
    """Write sharded TFRecords at `base.image_size` to data/prepared/, train augmented.

    Also saves reports/augment_preview.png (originals next to their variants).
    """
    from genderclf.data.augment import preview, run_augment

    settings = C.load_settings(params)
    meta = run_augment(settings, C.RAW_DIR, C.SPLITS_DIR, C.PREPARED_DIR, progress=not quiet)
    preview(settings, C.RAW_DIR, C.SPLITS_DIR, C.AUGMENT_PREVIEW)
    counts = ", ".join(f"{s} {m['records']} records/{len(m['shards'])} shards"
                       for s, m in meta["splits"].items())  # fmt: skip
    typer.echo(f"augment: {counts} at {meta['image_size']}px -> {C.PREPARED_DIR}/; "
               f"preview {C.AUGMENT_PREVIEW}")  # fmt: skip


@app.command()
@stage
def train(params: ParamsOpt = C.PARAMS_FILE) -> None:
    """Fine-tune the backbone (`train.backbone`) on data/prepared/ in two phases.

    Phase 1 trains the head on the frozen backbone, phase 2 unfreezes the top
    `train.finetune_blocks` blocks at `train.lr_finetune`. A killed run resumes from its
    last completed epoch when run again. Writes models/model.keras, models/run.json,
    metrics/train.json and plots/history.csv, and logs the run to MLflow.
    """
    from genderclf.model.train import run_train

    settings = C.load_settings(params)
    paths = {"model": C.MODEL_FILE, "run": C.RUN_FILE, "metrics": C.METRICS_DIR / "train.json",
             "history": C.PLOTS_DIR / "history.csv", "curves": C.PLOTS_DIR / "training_curves.png",
             "params": params, "source": C.SOURCE_FILE}  # fmt: skip
    m = run_train(settings, C.PREPARED_DIR, paths)
    typer.echo(f"train: best epoch {m['best_epoch']} val_accuracy {m['val_accuracy']} "
               f"-> {C.MODEL_FILE}")  # fmt: skip


@app.command()
@stage
def evaluate(params: ParamsOpt = C.PARAMS_FILE) -> None:
    """Score the model on the test split: metrics/eval.json and plots/ (also in MLflow).

    Accuracy, precision, recall, F1, ROC-AUC and calibration at a threshold chosen on the
    validation split; accuracy per attribute slice; the most confident mistakes.
    """
    from genderclf.model.evaluate import run_evaluate

    settings = C.load_settings(params)
    m = run_evaluate(settings, C.PREPARED_DIR, C.SPLITS_DIR, C.MODEL_FILE, C.RUN_FILE,
                     C.METRICS_DIR / "eval.json", C.PLOTS_DIR)  # fmt: skip
    auc = f"{m['roc_auc']:.4f}" if m["roc_auc"] is not None else "n/a"
    typer.echo(f"evaluate: accuracy {m['accuracy']:.4f} precision {m['precision']:.4f} "
               f"recall {m['recall']:.4f} f1 {m['f1']:.4f} roc_auc {auc} "
               f"(threshold {m['threshold']:.3f} from val) -> metrics/eval.json, plots/")  # fmt: skip


@app.command()
@stage
def register(params: ParamsOpt = C.PARAMS_FILE) -> None:
    """Register the model as a version of `gender-classifier`; promote it if it wins.

    Points `challenger` at the new version; moves `champion` only if the test accuracy
    is >= `register.min_accuracy` and beats the champion (evaluated on the same test
    split) by at least `register.min_improvement`. Writes reports/register.json.
    """
    from genderclf.tracking.registry import run_register

    settings = C.load_settings(params)
    r = run_register(settings, C.RUN_FILE, C.METRICS_DIR / "eval.json", C.PREPARED_DIR,
                     C.REGISTER_REPORT)  # fmt: skip
    typer.echo(
        f"register: {r['model_name']} version {r['version']} {r['decision']} "
        f"(champion now: version {r['champion_after']}). " + "; ".join(r["reasons"])
    )


@app.command()
@stage
def predict(
    paths: Annotated[list[Path], typer.Argument(help="Image files and/or folders (recursive).")],
    model_uri: Annotated[
        str,
        typer.Option(
            "--model-uri",
            "-m",
            help=(
                "MLflow model URI (models:/name@alias, models:/name/3, runs:/<id>/model, s3://...) "
                "or a local .keras file."
            ),
        ),
    ] = "models:/gender-classifier@champion",
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="table (console) | json | csv")
    ] = "table",
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help=("Write json/csv here (atomically) instead of stdout.")
        ),
    ] = None,
    no_detect: Annotated[
        bool,
        typer.Option(
            "--no-detect",
            help=("Classify whole images (already-cropped faces) instead of detected faces."),
        ),
    ] = False,
    threshold: Annotated[
        float | None,
        typer.Option(
            help=("Override the model's decision threshold on P(male)."), min=0.0, max=1.0
        ),
    ] = None,
    params: ParamsOpt = C.PARAMS_FILE,
    quiet: QuietOpt = False,
) -> None:
    """Classify the faces in new photos: one row per face (file, box, label, probability).

    Faces are found with OpenCV's bundled Haar cascade and cropped the way CelebA frames
    a face (`predict` section of params.yaml; defaults when there is no params.yaml). An
    image with no face is reported as `no_face`. A file that cannot be used (not an
    image, truncated, too big) gets an `error` row; the others are still classified and
    the command exits 1 with a summary.
    """
    from genderclf import predict as P

    if fmt not in ("table", "json", "csv"):
        raise typer.BadParameter("use table, json or csv", param_hint="--format")
    if output is not None and fmt == "table":
        raise typer.BadParameter("--output needs --format json or csv", param_hint="--output")
    cfg = (C.load_settings(params).predict if params.is_file() or params != C.PARAMS_FILE
           else C.PredictSettings())  # fmt: skip
    files, other = P.find_images(paths)
    if not files:
        raise P.PredictError(f"no images in {', '.join(map(str, paths))} "
                             f"(extensions: {', '.join(sorted(P.IMAGE_EXTENSIONS))})")  # fmt: skip
    clf = P.load_classifier(model_uri, threshold)
    detector = None if no_detect else P.FaceDetector.from_settings(cfg)
    progress = None
    if not quiet and len(files) > 5:
        from tqdm import tqdm

        def progress(it):
            return tqdm(it, total=len(files), desc="predict", unit="img", file=sys.stderr)

    rows = list(P.predict_images(files, clf, detector, cfg, progress))
    if fmt == "table":
        _print_table(rows)
    else:
        text = P.write_rows(rows, fmt, output)
        if text is not None:
            sys.stdout.write(text)
    s = P.summarize(rows, len(other))
    note = f"; {s.left_out} non-image files in the folders left out" if s.left_out else ""
    typer.echo(f"predict: {s.files} files, {s.faces} {'images' if no_detect else 'faces'} "
               f"classified, {s.no_face} without a face, {len(s.failed)} failed{note}"
               + (f" -> {output}" if output else ""), err=True)  # fmt: skip
    if s.failed:
        for f, why in s.failed[:20]:
            typer.secho(f"  {f}: {why}", fg=typer.colors.RED, err=True)
        if len(s.failed) > 20:
            typer.secho(f"  ... and {len(s.failed) - 20} more", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


def _print_table(rows: list[dict[str, Any]]) -> None:
    """Aligned plain-text columns; paths are never wrapped or cut, so they stay copyable."""
    head = ("file", "face", "box x,y,w,h", "label", "probability", "status")
    lines = [head]
    for r in rows:
        box = "" if r["x"] is None else f"{r['x']},{r['y']},{r['w']},{r['h']}"
        prob = "" if r["probability"] is None else f"{r['probability']:.3f}"
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['error']}"
        face = "" if r["face"] is None else str(r["face"])
        lines.append((r["file"], face, box, r["label"] or "", prob, status))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head) - 1)]
    for row in lines:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)]
        typer.echo("  ".join([*cells, row[-1]]).rstrip())


@app.command()
@stage
def compare(
    runs: Annotated[
        int, typer.Option("--runs", help="Compare the N most recent runs instead.")
    ] = 0,
) -> None:
    """Table of registered versions (metrics, differing params, data, aliases)."""
    from genderclf.tracking.compare import compare_runs, compare_versions

    typer.echo(compare_runs(runs) if runs else compare_versions())


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
