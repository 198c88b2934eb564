"""The tools of `genderclf`: `predict`, `drift`, `promote`, `rollback`, `compare`.

Commands a person runs on a trained pipeline, apart from the stage commands
(`genderclf.pipeline`): no `dvc.yaml` stage runs or depends on this module, so editing a
tool (its code or its help) re-runs no stage. The work they share with the flows lives in
`genderclf.services`; the `genderclf` command (`genderclf.cli`) offers both sets.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Any

import typer

from genderclf import services
from genderclf.command import DEFAULT_PARAMS, ParamsOpt, QuietOpt, command
from genderclf.config import PATHS, GenderclfError, load_settings
from genderclf.console import quiet_tensorflow

app = typer.Typer(
    help="Tools for a trained pipeline: predict, drift, promote, rollback, compare.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
@command()
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
    # A bare .keras file (no serving.json, no model.json beside it) is fitted as this
    # workspace's settings fit images.
    clf = load_classifier(model_uri, threshold, settings.augment.resize if settings else None)
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
) -> None:
    """Table of registered versions (metrics, differing params, data, aliases)."""
    from genderclf.tracking.compare import compare_runs, compare_versions

    typer.echo(compare_runs(runs) if runs else compare_versions())


if __name__ == "__main__":  # pragma: no cover
    app()
