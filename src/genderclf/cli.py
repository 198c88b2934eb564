"""`genderclf`: one command per pipeline stage (what `dvc.yaml` calls), plus tools.

Each command parses its arguments, loads the settings, runs `stages.<name>.run`, hands
the report to `tracking` where the stage is tracked, and prints one summary line. Known
failures print one readable message and exit 1, no traceback. The `run_<stage>` functions
are that glue without the argument parsing (tests and notebooks call them).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from genderclf.config import PATHS, GenderclfError, Paths, Settings, SettingsError, load_settings
from genderclf.console import quiet_tensorflow

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
ForceOpt = Annotated[bool, typer.Option("--force", help="Fetch even if the source is unchanged.")]


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("great_expectations", "absl", "h5py", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


STAGES = ("download", "validate", "split", "augment", "train", "evaluate", "register")


def command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command: logging set up, known errors shown as one message and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _setup_logging()
        try:
            return fn(*args, **kwargs)
        except (GenderclfError, FileNotFoundError, PermissionError) as err:
            hint = ""
            if isinstance(err, SettingsError) and fn.__name__ in STAGES:
                # `dvc repro` removes a stage's outputs before it runs the command.
                hint = (
                    f"\nAfter fixing it: `dvc repro {fn.__name__}`; to get back the "
                    f"outputs as they were, `dvc checkout {fn.__name__}`."
                )
            typer.secho(f"error ({fn.__name__}): {err}{hint}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None

    return wrapper


# --- the stages, as functions -----------------------------------------------------------------


def run_train(settings: Settings, paths: Paths = PATHS, params: Path = PATHS.params) -> Any:
    """Train and log the run to MLflow; the backup is dropped once both are done.

    With `train.processes` > 1 this process launches that many (`model.launch`) and
    returns their report; as one of them, it trains and only process 0 logs and writes.
    """
    if settings.train.processes > 1:  # trained on JAX: the checks below see that backend
        os.environ.setdefault("KERAS_BACKEND", "jax")
    quiet_tensorflow()
    from genderclf.model import distributed, launch
    from genderclf.stages import train
    from genderclf.tracking.runs import TrainingRun

    paths = replace(paths, train_backups=distributed.backup_root(paths.train_backups))
    backup = train.prepare(settings, paths)  # fail on bad inputs before MLflow is touched
    cluster = distributed.from_env()
    distributed.check(settings.train, cluster)
    if settings.train.processes > 1 and cluster is None:
        return launch.run(settings, paths, params, backup)
    with distributed.exit_on_error() if cluster else contextlib.nullcontext():
        if cluster is not None and not cluster.is_chief:
            return train.run(settings, paths)  # writes nothing: process 0 does
        with TrainingRun(settings, paths, backup) as run:
            report = train.run(settings, paths, on_epoch=run.log_epoch)
            run.log_training(report)
        train.discard_backup(report)
        return report


def run_evaluate(settings: Settings, paths: Paths = PATHS) -> Any:
    """Evaluate and log the metrics and plots into the training run."""
    quiet_tensorflow()
    from genderclf.stages import evaluate
    from genderclf.tracking.runs import log_evaluation

    report = evaluate.run(settings, paths)
    log_evaluation(paths, report.metrics, report.plots)
    return report


def run_register(settings: Settings, paths: Paths = PATHS) -> dict[str, Any]:
    """Register against the configured MLflow registry; returns register.json's content."""
    quiet_tensorflow()
    from genderclf.stages import register
    from genderclf.tracking.registry import MlflowRegistry

    registry = MlflowRegistry(settings.registry.retries)  # connects on first use
    with registry.failures_explained(paths):
        return register.run(settings, paths, registry)


def run_drift(
    settings: Settings, location: str, paths: Paths = PATHS, reference: Path | None = None
) -> Any:
    """Check a batch against the champion and its reference; log the check to MLflow.

    The champion is resolved once and loaded by version, so the model and the reference
    belong together even if the alias moves meanwhile. `reference` (a local .npz) replaces
    the registered one.
    """
    import tempfile

    quiet_tensorflow()
    from genderclf.monitor.drift import check
    from genderclf.monitor.profile import Profile
    from genderclf.tracking.monitor import champion, download_reference, log_drift
    from genderclf.tracking.serving import load_classifier

    champ = champion(settings.registry.retries)
    with tempfile.TemporaryDirectory(prefix="genderclf-ref-") as tmp:
        ref_file = reference or download_reference(champ, Path(tmp), settings.registry.retries)
        ref = Profile.load(ref_file, f"reference of version {champ.version} ({ref_file})")
    clf = load_classifier(champ.model_uri)
    report = check(location, clf, ref, settings, paths.drift, champ.describe())
    log_drift(report.result, report.files, champ)
    return report


# --- the commands ------------------------------------------------------------------------------


@app.command()
@command
def download(
    params: ParamsOpt = PATHS.params,
    quiet: QuietOpt = False,
    force: ForceOpt = False,
) -> None:
    """Fetch the dataset (`data.source`: sample | kaggle | dir | s3) into data/raw/.

    The source is listed first; an unchanged listing keeps data/raw/ as it is. The folder
    is replaced only when the download is complete; data/raw/SOURCE.json records the
    source, time, file count, a content checksum and the listing.
    """
    from genderclf.stages import download as stage

    report = stage.run(load_settings(params), PATHS, progress=not quiet, force=force)
    rec = report.record
    refused = f"; {len(rec['refused'])} links refused" if rec["refused"] else ""
    what = "files from" if report.fetched else "files kept, unchanged:"
    typer.echo(
        f"download: {rec['file_count']} {what} {rec['source']} -> {PATHS.raw}/ "
        f"({rec['checksum'][:19]}...){refused}"
    )


@app.command()
@command
def validate(params: ParamsOpt = PATHS.params, quiet: QuietOpt = False) -> None:
    """Check every image and the label table (Great Expectations); write the manifest.

    Writes data/validated/manifest.csv (usable images) and reports/validation/
    (rejected.csv with a reason per file, GX results JSON, Data Docs HTML). Fails when an
    expectation fails or more than `validate.max_reject_fraction` of the files are rejected.
    """
    from genderclf.stages import validate as stage

    s = stage.run(load_settings(params), PATHS, progress=not quiet).summary
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(s["reject_reasons"].items())) or "none"
    typer.echo(
        f"validate: {s['usable']} usable, {s['rejected']} rejected ({reasons}); male "
        f"fraction {s['male_fraction']}; expectations passed. Reports: "
        f"{PATHS.validation}/"
    )


@app.command()
@command
def split(params: ParamsOpt = PATHS.params) -> None:
    """Split the manifest into data/splits/{train,val,test}.csv (`split.strategy`)."""
    from genderclf.data.split import balance_table
    from genderclf.stages import split as stage

    r = stage.run(load_settings(params), PATHS)
    typer.echo(f"split ({r.strategy}):\n{balance_table(r.counts)}")
    if r.identity_overlap is not None:
        typer.echo(f"identities in more than one split: {r.identity_overlap}")


@app.command()
@command
def augment(params: ParamsOpt = PATHS.params, quiet: QuietOpt = False) -> None:
    """Write sharded TFRecords at `base.image_size` to data/prepared/, train augmented.

    Also saves reports/augment_preview.png (originals next to their variants).
    """
    quiet_tensorflow()
    from genderclf.stages import augment as stage

    r = stage.run(load_settings(params), PATHS, progress=not quiet)
    counts = ", ".join(
        f"{s} {m['records']} records/{len(m['shards'])} shards" for s, m in r.meta["splits"].items()
    )
    typer.echo(
        f"augment: {counts} at {r.meta['image_size']}px -> {r.prepared}/; preview {r.preview}"
    )


@app.command()
@command
def train(params: ParamsOpt = PATHS.params) -> None:
    """Fine-tune the backbone (`train.backbone`) on data/prepared/ in two phases.

    Phase 1 trains the head on the frozen backbone, phase 2 unfreezes the top
    `train.finetune_blocks` blocks at `train.lr_finetune`. A killed run resumes from its
    last completed epoch when run again. Writes models/model.keras, models/run.json,
    metrics/train.json and plots/history.csv, and logs the run to MLflow.
    """
    report = run_train(load_settings(params), params=params)
    if report is None:  # one of several training processes, not the first
        return
    m = report.metrics
    typer.echo(
        f"train: best epoch {m['best_epoch']} val_accuracy {m['val_accuracy']} -> {PATHS.model}"
    )


@app.command()
@command
def evaluate(params: ParamsOpt = PATHS.params) -> None:
    """Score the model on the test split: metrics/eval.json and plots/ (also in MLflow).

    Accuracy, precision, recall, F1, ROC-AUC and calibration at a threshold chosen on the
    validation split; accuracy per attribute slice; the most confident mistakes.
    """
    m = run_evaluate(load_settings(params)).metrics
    auc = f"{m['roc_auc']:.4f}" if m["roc_auc"] is not None else "n/a"
    typer.echo(
        f"evaluate: accuracy {m['accuracy']:.4f} precision {m['precision']:.4f} "
        f"recall {m['recall']:.4f} f1 {m['f1']:.4f} roc_auc {auc} "
        f"(threshold {m['threshold']:.3f} from val) -> {PATHS.eval_metrics}, "
        f"{PATHS.plots}/"
    )


@app.command()
@command
def register(params: ParamsOpt = PATHS.params) -> None:
    """Register the model as a version of `gender-classifier`; promote it if it wins.

    Points `challenger` at the new version; moves `champion` only if the test accuracy
    is >= `register.min_accuracy` and beats the champion (evaluated on the same test
    split) by at least `register.min_improvement`. Writes reports/register.json.
    """
    r = run_register(load_settings(params))
    typer.echo(
        f"register: {r['model_name']} version {r['version']} {r['decision']} "
        f"(champion now: version {r['champion_after']}). " + "; ".join(r["reasons"])
    )


@app.command()
@command
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
        str,
        typer.Option(
            "--format",
            "-f",
            help="table (console) | json | jsonl (one object per line, as they come) | csv",
        ),
    ] = "table",
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Write json/csv here (atomically) or jsonl (line by line) instead of stdout.",
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
        typer.Option(help="Override the model's decision threshold on P(male).", min=0.0, max=1.0),
    ] = None,
    params: ParamsOpt = PATHS.params,
    quiet: QuietOpt = False,
) -> None:
    """Classify the faces in new photos: one row per face (file, box, label, probability).

    Faces are found with the detector `predict.detector` names (BlazeFace by default,
    OpenCV's Haar cascade as the light fallback) and cropped the way CelebA frames a face.
    The image size and threshold come from the model; detection and cropping from the
    `predict` section of params.yaml, or of the registered model when there is no
    params.yaml. An image with no face is reported as `no_face`. A file that cannot be
    used (not an image, truncated, too big) gets an `error` row; the others are still
    classified and the command exits 1 with a summary. json, jsonl and csv rows are
    written as they come (memory stays flat on big folders); a table is printed at the end.
    """
    quiet_tensorflow()
    from genderclf import inference as I
    from genderclf.console import Progress, render_table
    from genderclf.tracking.serving import load_classifier

    if fmt not in I.FORMATS:
        raise typer.BadParameter(f"use {', '.join(I.FORMATS)}", param_hint="--format")
    if output is not None and fmt == "table":
        raise typer.BadParameter(
            "--output needs --format json, jsonl or csv", param_hint="--output"
        )
    settings = load_settings(params) if params.is_file() or params != PATHS.params else None
    files, other = I.find_images(paths)
    if not files:
        raise I.PredictError(
            f"no images in {', '.join(map(str, paths))} "
            f"(extensions: {', '.join(sorted(I.IMAGE_EXTENSIONS))})"
        )
    fallback = (
        I.ServingConfig(
            0, settings.augment.resize, I.DEFAULT_THRESHOLD, settings.predict.model_dump()
        )
        if settings
        else None
    )
    clf = load_classifier(model_uri, threshold, fallback)
    cfg = settings.predict if settings else clf.config.predict_settings()
    if cfg is None:
        raise I.PredictError(
            f"{model_uri} carries no `predict` settings: run from the project "
            "(with its params.yaml) or pass --params"
        )
    detector = None if no_detect else I.make_detector(cfg)
    summary = I.Summary(left_out=len(other))
    table: list[tuple[str, ...]] = []
    with (
        Progress(len(files), "predict", enabled=not quiet and len(files) > 5) as bar,
        contextlib.nullcontext() if fmt == "table" else I.row_writer(fmt, output) as out,
    ):
        for row in I.predict_images(files, clf, detector, cfg, bar.wrap):
            summary.add(row)
            if out is None:
                table.append(_table_row(row))
            else:
                out.write(row)
    if fmt == "table":
        typer.echo(
            render_table(
                ("file", "face", "box x,y,w,h", "label", "probability", "status"),
                table,
                right=["probability"],
            )
        )
    s = summary
    note = f"; {s.left_out} non-image files in the folders left out" if s.left_out else ""
    typer.echo(
        f"predict: {s.files} files, {s.faces} {'images' if no_detect else 'faces'} "
        f"classified, {s.no_face} without a face, {len(s.failed)} failed{note}"
        + (f" -> {output}" if output else ""),
        err=True,
    )
    if s.failed:
        for f, why in s.failed[:20]:
            typer.secho(f"  {f}: {why}", fg=typer.colors.RED, err=True)
        if len(s.failed) > 20:
            typer.secho(f"  ... and {len(s.failed) - 20} more", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


def _table_row(r: dict[str, Any]) -> tuple[str, ...]:
    box = "" if r["x"] is None else f"{r['x']},{r['y']},{r['w']},{r['h']}"
    prob = "" if r["probability"] is None else f"{r['probability']:.3f}"
    status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['error']}"
    face = "" if r["face"] is None else str(r["face"])
    return (r["file"], face, box, r["label"] or "", prob, status)


@app.command()
@command
def drift(
    location: Annotated[str, typer.Argument(help="A folder of images or s3://bucket/prefix.")],
    reference: Annotated[
        Path | None,
        typer.Option(help="A local reference .npz instead of the champion's registered one."),
    ] = None,
    params: ParamsOpt = PATHS.params,
) -> None:
    """Check a batch of new images against the champion: has the data drifted?

    The champion (`gender-classifier@champion`) profiles the batch as evaluate profiled its
    test images: image statistics (KS per feature, Bonferroni), its embeddings (MMD with a
    permutation test) and its predictions (male fraction, mean confidence), thresholds in
    the `drift` section of params.yaml. Writes reports/drift/ (drift.json, summary.md,
    drift.png) and logs the check to MLflow. Exit 0: no drift; 3: drift (the summary says
    where); 1: the check could not run (e.g. fewer than `drift.min_images` images).
    """
    from genderclf.monitor.drift import DRIFT_EXIT_CODE

    report = run_drift(load_settings(params), location, PATHS, reference)
    typer.echo(report.summary)
    typer.echo(f"drift: report in {PATHS.drift}/ (drift.json, summary.md, drift.png)")
    if report.drifted:
        raise typer.Exit(DRIFT_EXIT_CODE)


@app.command()
@command
def promote(
    version: Annotated[str, typer.Argument(help="The version of gender-classifier to promote.")],
    reason: Annotated[str, typer.Option("--reason", "-r", help="Why (kept with the move).")],
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Move `champion` even if the gate fails (recorded as forced)."
        ),
    ] = False,
    params: ParamsOpt = PATHS.params,
) -> None:
    """Make VERSION the champion through the promotion gate (as `register` does).

    The version and the current champion are scored on this workspace's test split; every
    check is printed. The move is kept on both versions (who, when, from, to, why).
    """
    from genderclf.stages import register as stage
    from genderclf.tracking.registry import MlflowRegistry

    quiet_tensorflow()
    settings = load_settings(params)
    registry = MlflowRegistry(settings.registry.retries)
    with registry.failures_explained(PATHS):
        out = stage.promote(settings, PATHS, registry, version, reason, force=force)
    for c in out["checks"]:
        typer.echo(f"  {'pass' if c['passed'] else 'FAIL'} {c['name']}: {c['summary']}")
    if not out["moved"]:
        failed = [c["name"] for c in out["checks"] if not c["passed"]]
        raise GenderclfError(
            f"version {version} not promoted: "
            + (
                f"the gate failed ({', '.join(failed)}); --force to promote anyway"
                if failed
                else "it is already the champion"
            )
        )
    m = out["move"]
    typer.echo(f"promote: champion {m['from']} -> {m['to']} ({m['reason'][:120]})")


@app.command()
@command
def rollback(
    reason: Annotated[str, typer.Option("--reason", "-r", help="Why (kept with the move).")],
    params: ParamsOpt = PATHS.params,
) -> None:
    """Point `champion` back at the version it replaced (from the recorded alias history)."""
    from genderclf.tracking.registry import MlflowRegistry

    registry = MlflowRegistry(load_settings(params).registry.retries)
    with registry.failures_explained(PATHS):
        pair = registry.previous_champion()
        if pair is None:
            raise GenderclfError("no earlier champion is recorded: nothing to roll back to")
        now, before = pair
        move = registry.promote(before, now, f"rollback: {reason}")
    if move is None:
        raise GenderclfError("the champion changed while rolling back; run it again")
    typer.echo(f"rollback: champion {now} -> {before}")


@app.command()
@command
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
