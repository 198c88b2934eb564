"""The tools of `genderclf`: `predict`, `drift`, `promote`, `rollback`, `compare`, and
`tune --apply` (`apply_tuned`: `genderclf.cli` puts it on the tune stage's command).

Commands a person runs on a trained pipeline, apart from the stage commands
(`genderclf.pipeline`): no `dvc.yaml` stage runs or depends on this module, so editing a
tool (its code or its help) re-runs no stage. The work they share with the flows lives in
`genderclf.services`; the `genderclf` command (`genderclf.cli`) offers both sets.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from genderclf import services
from genderclf.command import DEFAULT_PARAMS, ParamsOpt, QuietOpt, command
from genderclf.config import PATHS, GenderclfError, PredictSettings, Settings, load_settings
from genderclf.console import quiet_tensorflow
from genderclf.engine import cluster_address
from genderclf.io import chunked

if TYPE_CHECKING:
    from genderclf.inference import ServingConfig

# Chunks in flight per predict actor: one running, one waiting, so an actor never idles.
IN_FLIGHT_PER_ACTOR = 2

app = typer.Typer(
    help="Tools for a trained pipeline: predict, drift, promote, rollback, compare.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
@command()
def predict(
    paths: Annotated[
        list[str],
        typer.Argument(help="Image files and/or folders (recursive), or s3://bucket/prefix."),
    ],
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
        typer.Option(
            help="Override the model's decision threshold, on its raw output (the scale of "
            "`threshold_raw` in metrics/eval.json).",
            min=0.0,
            max=1.0,
        ),
    ] = None,
    params: ParamsOpt = DEFAULT_PARAMS,
    quiet: QuietOpt = False,
) -> None:
    """Classify the faces in new photos: one row per face (file, box, label, probability).

    The photos are files, folders or S3 prefixes (s3://bucket/prefix; endpoint from
    data.s3.endpoint_url or AWS_ENDPOINT_URL). With RAY_ADDRESS set they are classified on
    that Ray cluster (the model loaded once per worker), with the same rows.

    Faces are found with the detector `predict.detector` names (BlazeFace by default,
    OpenCV's Haar cascade as the light fallback) and cropped the way CelebA frames a face.
    The image size and threshold come from the model; detection and cropping from the
    `predict` section of params.yaml, or of the registered model when there is no
    params.yaml. An image with no face is reported as `no_face`. A file that cannot be
    used (not an image, truncated, too big) gets an `error` row; the others are still
    classified and the command exits 1 with a summary. json, jsonl and csv rows are
    written as they come (memory stays flat on big folders); a table is printed at the end.
    """
    from genderclf import inference as I
    from genderclf.console import Progress, render_table

    if fmt not in I.FORMATS:
        raise typer.BadParameter(f"use {', '.join(I.FORMATS)}", param_hint="--format")
    if output is not None and fmt == "table":
        raise typer.BadParameter(
            "--output needs --format json, jsonl or csv", param_hint="--output"
        )
    settings = load_settings(params) if params.is_file() or params != PATHS.params else None
    summary = I.Summary()
    table: list[tuple[str, ...]] = []
    # The images are listed and classified as a stream, here or on the Ray cluster that
    # RAY_ADDRESS names (`predict_rows`): rows come in input order either way.
    with (
        Progress(None, "predict", enabled=not quiet) as bar,
        contextlib.nullcontext() if fmt == "table" else I.row_writer(fmt, output) as out,
    ):
        run = predict_rows(paths, model_uri, settings, threshold, not no_detect, bar.wrap)
        for row in run.rows:
            summary.add(row)
            if out is None:
                table.append(_table_row(row))
            else:
                out.write(row)
    summary.left_out = run.left_out
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
    # Without detection nothing is said about faces (each image is classified whole).
    found = (
        f"{s.faces} images classified"
        if no_detect
        else f"{s.faces} faces classified, {s.no_face} without a face"
    )
    typer.echo(
        f"predict: {s.files} files, {found}, {len(s.failed)} failed{note}"
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


# --- predict's stream: here, or on Ray actors -------------------------------------------------
#
# Both paths list the images as a stream (a folder walk, S3's paginated listing), cut it
# into chunks of `predict.batch_size` images and run `inference.predict_images` on each
# chunk, so they give the same rows, in input order (each row names its file: the path as
# given, or `s3://bucket/key`). On a cluster every actor loads the model once (sent through
# Ray's object store: nodes need no access to the MLflow server), chunks go round the
# actors with a few in flight per actor, and the driver only lists, writes rows and never
# loads TensorFlow: its memory is flat in the number of images (`benchmarks/cluster.py`).
# A folder must be on a filesystem every node mounts at the same path; S3 objects are read
# by the workers with their node's own credentials.


@dataclass
class Listing:
    """The images of the locations, streamed as (row name, source) pairs; `left_out`
    counts the non-image files of the folders and prefixes once the stream is consumed."""

    locations: list[str]
    endpoint_url: str | None = None
    retries: int = 3
    absolute: bool = False  # sources as absolute paths (for workers in other processes)
    _other: list[Path] = field(default_factory=list)
    _skipped: list[int] = field(default_factory=lambda: [0])

    @property
    def left_out(self) -> int:
        return len(self._other) + self._skipped[0]

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        from genderclf.inference import iter_images
        from genderclf.monitor.batch import is_s3, walk_objects

        for loc in self.locations:
            if is_s3(loc):
                yield from walk_objects(loc, self._skipped, self.endpoint_url, self.retries)
            else:
                for p in iter_images([loc], self._other):
                    yield str(p), (p.resolve() if self.absolute else p)


@dataclass
class PredictRun:
    """The rows of one `genderclf predict`, streamed; `left_out` is final once consumed."""

    rows: Iterator[dict[str, Any]]
    listing: Listing
    engine: str

    @property
    def left_out(self) -> int:
        return self.listing.left_out


def predict_rows(
    locations: list[str],
    model_uri: str,
    settings: Settings | None,
    threshold: float | None = None,
    detect: bool = True,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
) -> PredictRun:
    """Classify the images of `locations` (files, folders, `s3://bucket/prefix`).

    Runs here, or on the Ray cluster RAY_ADDRESS names; the rows are the same.

    Args:
        settings: the project's settings (None: the `predict` section stored with the model).
        threshold: replaces the model's decision threshold.
        detect: find faces (False: classify whole images).
        progress: wraps the stream of images (a progress bar).

    Raises:
        PredictError: no model there, no `predict` settings, no images (when the stream
            ends), or a location that does not exist.
        ClusterError: RAY_ADDRESS names no usable cluster.
    """
    s3 = settings.data.s3 if settings else None
    endpoint = s3.endpoint_url if s3 else None
    retries = s3.retries if s3 else 3
    on_cluster = cluster_address() is not None
    listing = Listing(list(locations), endpoint, retries, absolute=on_cluster)
    images: Iterable[Any] = progress(listing) if progress else listing
    make = _on_cluster if on_cluster else _here
    rows = make(images, model_uri, settings, threshold, detect)
    return PredictRun(_not_empty(rows, locations), listing, "ray" if on_cluster else "local")


def _settings_for(
    settings: Settings | None, config: ServingConfig | None, model_uri: str
) -> PredictSettings:
    from genderclf.inference import PredictError

    cfg = settings.predict if settings else (config.predict_settings() if config else None)
    if cfg is None:
        raise PredictError(
            f"{model_uri} carries no `predict` settings: run from the project "
            "(with its params.yaml) or pass --params"
        )
    return cfg


def _not_empty(rows: Iterator[dict[str, Any]], locations: list[str]) -> Iterator[dict[str, Any]]:
    from genderclf.inference import IMAGE_EXTENSIONS, PredictError

    n = 0
    for row in rows:
        n += 1
        yield row
    if n == 0:
        raise PredictError(
            f"no images in {', '.join(map(str, locations))} "
            f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )


def _here(
    images: Iterable[tuple[str, Any]],
    model_uri: str,
    settings: Settings | None,
    threshold: float | None,
    detect: bool,
) -> Iterator[dict[str, Any]]:
    from genderclf.inference import make_detector, predict_images
    from genderclf.tracking.serving import load_classifier

    quiet_tensorflow()
    # A bare .keras file (no serving.json, no model.json beside it) is fitted as this
    # workspace's settings fit images.
    clf = load_classifier(model_uri, threshold, settings.augment.resize if settings else None)
    cfg = _settings_for(settings, clf.config, model_uri)
    detector = make_detector(cfg) if detect else None
    for chunk in chunked(images, cfg.batch_size):
        yield from predict_images(chunk, clf, detector, cfg)


def _actor_class() -> type:
    """`inference.Predictor` with TensorFlow's start-up notices off: the Ray actor's class
    (made here so that the command line does not import inference until it predicts)."""
    from genderclf.inference import Predictor

    class QuietPredictor(Predictor):
        def __init__(self, *args: Any) -> None:
            quiet_tensorflow()
            super().__init__(*args)

    return QuietPredictor


def _on_cluster(
    images: Iterable[tuple[str, Any]],
    model_uri: str,
    settings: Settings | None,
    threshold: float | None,
    detect: bool,
) -> Iterator[dict[str, Any]]:
    from genderclf import engine
    from genderclf.inference import PredictError, ServingConfig, model_files, model_payload

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="genderclf-model-")))
        if Path(model_uri).exists():
            path = Path(model_uri)
        else:
            from genderclf.tracking.serving import fetch_model

            path = fetch_model(model_uri, tmp)
        payload = model_payload(path)
        config_file = model_files(path)[1]
        config = ServingConfig.read(config_file) if config_file else None
        if config is None and settings is None:
            raise PredictError(
                f"{model_uri} has no serving.json (threshold, resize mode): use a registered "
                "model, or run from the project with its params.yaml"
            )
        cfg = _settings_for(settings, config, model_uri)
        ray = engine.connect()
        model = ray.put(payload)
        del payload
        gpus = int(ray.cluster_resources().get("GPU", 0))
        count = gpus or engine.cluster_cpus(ray)
        actor = ray.remote(
            num_cpus=0 if gpus else 1,
            num_gpus=1 if gpus else 0,
            max_restarts=engine.TASK_RETRIES,
            max_task_retries=engine.TASK_RETRIES,
        )(_actor_class())
        resize = settings.augment.resize if settings else None
        args = (model, model_uri, resize, threshold, cfg.model_dump(), detect)
        actors = [actor.remote(*args) for _ in range(count)]
        stack.callback(lambda: [ray.kill(a) for a in actors])
        submit = (
            actors[i % count].rows.remote(chunk)
            for i, chunk in enumerate(chunked(images, cfg.batch_size))
        )
        for rows in engine.ordered(ray, submit, IN_FLIGHT_PER_ACTOR * count):
            yield from rows


@app.command()
@command()
def drift(
    location: Annotated[str, typer.Argument(help="A folder of images or s3://bucket/prefix.")],
    reference: Annotated[
        Path | None,
        typer.Option(help="A local reference .npz instead of the champion's registered one."),
    ] = None,
    params: ParamsOpt = DEFAULT_PARAMS,
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

    report = services.check_drift(load_settings(params), location, PATHS, reference)
    typer.echo(report.summary)
    typer.echo(f"drift: report in {PATHS.drift}/ (drift.json, summary.md, drift.png)")
    if report.drifted:
        raise typer.Exit(DRIFT_EXIT_CODE)


@app.command()
@command()
def promote(
    version: Annotated[str, typer.Argument(help="The version of gender-classifier to promote.")],
    reason: Annotated[str, typer.Option("--reason", "-r", help="Why (kept with the move).")],
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Move `champion` even if the gate fails (recorded as forced)."
        ),
    ] = False,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Make VERSION the champion through the promotion gate (as `register` does).

    The version and the current champion are scored on this workspace's test split; every
    check is printed. The move is kept on both versions (who, when, from, to, why).
    """
    out = services.promote(load_settings(params), PATHS, version, reason, force=force)
    for c in out.checks:
        typer.echo(f"  {'pass' if c.passed else 'FAIL'} {c.name}: {c.summary}")
    if not out.moved:
        failed = [c.name for c in out.checks if not c.passed]
        raise GenderclfError(
            f"version {version} not promoted: "
            + (
                f"the gate failed ({', '.join(failed)}); --force to promote anyway"
                if failed
                else "it is already the champion"
            )
        )
    m = out.move or {}
    typer.echo(f"promote: champion {m['from']} -> {m['to']} ({m['reason'][:120]})")


@app.command()
@command()
def rollback(
    reason: Annotated[str, typer.Option("--reason", "-r", help="Why (kept with the move).")],
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Point `champion` back at the version it replaced (from the recorded alias history)."""
    now, before = services.rollback(load_settings(params), reason)
    typer.echo(f"rollback: champion {now} -> {before}")


@app.command()
@command()
def compare(
    runs: Annotated[
        int, typer.Option("--runs", help="Compare the N most recent runs instead.")
    ] = 0,
    backbones: Annotated[
        bool,
        typer.Option(
            "--backbones",
            help="Compare the backbones instead: parameters, size on disk, predict latency "
            "on this machine, and the validation accuracy of those trained (logged to MLflow).",
        ),
    ] = False,
    image_size: Annotated[
        int | None,
        typer.Option(help="--backbones: the input size (default: base.image_size).", min=16),
    ] = None,
    repeats: Annotated[
        int, typer.Option(help="--backbones: timed predict calls per figure.", min=1)
    ] = 10,
    plot: Annotated[
        Path | None, typer.Option(help="--backbones: also save the plot (PNG) here.")
    ] = None,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Table of registered versions (metrics, differing params, data, aliases)."""
    if backbones:
        quiet_tensorflow()
        from genderclf.tracking.compare import compare_backbones

        settings = load_settings(params)
        size = image_size or settings.base.image_size
        typer.echo(compare_backbones(settings, size, repeats, plot))
        return
    from genderclf.tracking.compare import compare_runs, compare_versions

    typer.echo(compare_runs(runs) if runs else compare_versions())


ApplyOpt = Annotated[
    bool,
    typer.Option(
        "--apply",
        help="Write the search's winner (params/tuned.yaml) into params.yaml and set "
        "tune.enabled: false, keeping the file's comments and layout. Runs no search.",
    ),
]


@command()
def apply_tuned(params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """`genderclf tune --apply`: the search's winner (params/tuned.yaml) into params.yaml.

    Not a command of its own: `genderclf.cli` offers it as the `--apply` option of the tune
    stage's command, so that the stage (`python -m genderclf.pipeline tune`, what dvc.yaml
    runs) never depends on this module.

    Raises:
        TunedParamsError: params/tuned.yaml is missing or unreadable.
        SettingsError: the result would not be valid settings (params.yaml is left as it was).
    """
    changed = services.apply_tuned(PATHS.tuned_params, params)
    for key, (old, new) in changed.items():
        typer.echo(f"  train.{key}: {old} -> {new}")
    typer.echo(
        f"tune --apply: {len(changed)} train value(s) changed in {params}; "
        "tune.enabled set to false (set it back to true to search again)"
    )


if __name__ == "__main__":  # pragma: no cover
    app()
