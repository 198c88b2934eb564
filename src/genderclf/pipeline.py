"""The pipeline's stage commands: what `dvc.yaml` runs, `python -m genderclf.pipeline <stage>`.

One command per stage, named like it: parse the options, load the settings, run
`stages.<name>.run` (and, for train, evaluate and register, hand the report to
`genderclf.tracking`), print one summary line. Known failures print one readable message
and exit 1, no traceback.

Only stage commands live here. The tools (`predict`, `drift`, `promote`, `rollback`,
`compare`) are in `genderclf.tools`, which no stage depends on, so editing a tool re-runs
no stage; the `genderclf` command (`genderclf.cli`) offers both. The `run_<stage>`
functions are the glue without the argument parsing (tests and notebooks call them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from genderclf.command import DEFAULT_PARAMS, ParamsOpt, QuietOpt, command
from genderclf.config import PATHS, Paths, Settings, load_settings
from genderclf.console import quiet_tensorflow

STAGES = ("download", "validate", "split", "augment", "tune", "train", "evaluate", "register")

app = typer.Typer(
    help="The pipeline's stages, in order: download -> validate -> split -> augment -> "
    "tune -> train -> evaluate -> register (`dvc repro` runs them; each command here runs "
    "one).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
ForceOpt = Annotated[bool, typer.Option("--force", help="Fetch even if the source is unchanged.")]


# --- the stages with their tracking, as functions ---------------------------------------------


def run_tune(settings: Settings, paths: Paths = PATHS) -> Any:
    """Search (or, with tune.enabled false, pass the params through) and log the search to
    MLflow. Returns the stage's TuneReport."""
    from genderclf.stages import tune

    if not settings.tune.enabled:
        return tune.passthrough(settings, paths)  # seconds: no TensorFlow, no MLflow
    quiet_tensorflow()
    from genderclf.tracking.tune import SearchRun

    plan = tune.prepare(settings, paths)  # fail on bad inputs before MLflow is touched
    with SearchRun(settings, paths, plan) as run:
        report = tune.run(settings, paths, plan, run)
        run.log_search(report)
    return report


def run_train(settings: Settings, paths: Paths = PATHS, params: Path = PATHS.params) -> Any:
    """Train and log the run to MLflow; the backup is dropped once both are done.
    Returns the stage's TrainReport.

    With `tune.enabled` the train values are the search's (params/tuned.yaml): the model's
    `TrainedModel.train` and the run's params record those, so every later stage reads
    what the model was trained with from the model, not from params.yaml.

    With `train.processes` > 1 this process launches that many (`model.launch`, each one
    running this command) and returns their LaunchReport (process 0's metrics); as one of
    them, it trains, and only process 0 writes the outputs and logs the run (the others
    return None).
    """
    if settings.train.processes > 1:  # trained on JAX: the checks below see that backend
        os.environ.setdefault("KERAS_BACKEND", "jax")
    quiet_tensorflow()
    from genderclf.stages import train
    from genderclf.tracking.runs import TrainingTracker

    plan = train.prepare(settings, paths)  # fail on bad inputs before MLflow is touched
    settings = plan.settings  # the tuned values when tune.enabled
    cluster = train.process(settings)
    if settings.train.processes > 1 and cluster is None:
        return train.launch(settings, paths, params, plan)
    with train.one_of(cluster):
        if cluster is not None and not cluster.is_chief:
            return train.run(settings, paths, plan=plan)  # writes nothing: process 0 does
        with TrainingTracker(settings, paths, plan.backup, plan.data) as tracker:
            report = train.run(settings, paths, on_epoch=tracker.log_epoch, plan=plan)
            tracker.log_training(report)
        train.discard_backup(report)
        return report


def run_evaluate(settings: Settings, paths: Paths = PATHS) -> Any:
    """Evaluate and log the metrics and plots into the training run. Returns the stage's
    EvaluateReport."""
    quiet_tensorflow()
    from genderclf.stages import evaluate
    from genderclf.tracking.runs import log_evaluation

    report = evaluate.run(settings, paths)
    log_evaluation(paths, report.model, report.evaluation, report.plots)
    return report


def run_register(settings: Settings, paths: Paths = PATHS) -> Any:
    """Register against the configured MLflow registry. Returns the stage's RegisterReport
    (its `decision` is what reports/register.json holds)."""
    quiet_tensorflow()
    from genderclf.stages import register
    from genderclf.tracking.registry import open_registry

    kept = (
        f"The trained model and {paths.eval_metrics} are kept, and a re-run reuses the version "
        "registered from this training"
    )
    with open_registry(settings.registry.retries, "the register stage", kept) as registry:
        return register.run(settings, paths, registry)


# --- the commands ------------------------------------------------------------------------------


@app.command()
@command(stage=True, keeps_outputs=True)
def download(
    params: ParamsOpt = DEFAULT_PARAMS, quiet: QuietOpt = False, force: ForceOpt = False
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
        f"({rec['checksum'][:19]}...){refused} in {report.seconds:.1f}s"
    )


@app.command()
@command(stage=True)
def validate(params: ParamsOpt = DEFAULT_PARAMS, quiet: QuietOpt = False) -> None:
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
@command(stage=True)
def split(params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Split the manifest into data/splits/{train,val,test}.csv (`split.strategy`)."""
    from genderclf.data.split import balance_table
    from genderclf.stages import split as stage

    r = stage.run(load_settings(params), PATHS)
    typer.echo(f"split ({r.strategy}):\n{balance_table(r.counts)}")
    if r.identity_overlap is not None:
        typer.echo(f"identities in more than one split: {r.identity_overlap}")


@app.command()
@command(stage=True)
def augment(params: ParamsOpt = DEFAULT_PARAMS, quiet: QuietOpt = False) -> None:
    """Write sharded TFRecords at `base.image_size` to data/prepared/, train augmented.

    Also saves reports/augment_preview.png (originals next to their variants).
    """
    quiet_tensorflow()
    from genderclf.stages import augment as stage

    r = stage.run(load_settings(params), PATHS, progress=not quiet)
    counts = ", ".join(
        f"{s} {m.records} records/{len(m.shards)} shards" for s, m in r.data.splits.items()
    )
    typer.echo(f"augment: {counts} at {r.data.image_size}px -> {r.prepared}/; preview {r.preview}")


@app.command()
@command(stage=True)
def tune(params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Search train.* hyperparameters on the validation split (Optuna): params/tuned.yaml.

    With `tune.enabled: false` (the demo) it writes params.yaml's own values of the
    searched keys, in seconds. With true: a seeded TPE search over `tune.space`, pruning on
    the per-epoch validation metric, `tune.trials` trials (on a Ray cluster when
    RAY_ADDRESS is set); each trial is an MLflow run nested under the search's run. A
    killed search continues where it stopped when run again. Train uses the winner;
    `genderclf tune --apply` copies it into params.yaml.
    """
    r = run_tune(load_settings(params))
    if not r.enabled:
        typer.echo(f"tune: off (tune.enabled: false); train.* as they are -> {PATHS.tuned_params}")
        return
    m = r.metrics
    chosen = ", ".join(f"{k}={v}" for k, v in sorted(r.tuned.train.items()))
    typer.echo(
        f"tune: best trial {m['best_trial']} {m['metric']} {m['best_value']} (params.yaml's "
        f"values: {m['start_value']}); trials {m['trials']} -> {PATHS.tuned_params}: {chosen}"
    )


@app.command()
@command(stage=True)
def train(params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Fine-tune the backbone (`train.backbone`) on data/prepared/ in two phases.

    Phase 1 trains the head on the frozen backbone, phase 2 unfreezes the top
    `train.finetune_blocks` blocks at `train.lr_finetune`. A killed run resumes from its
    last completed epoch when run again. Writes models/model.keras with models/model.json,
    metrics/train.json and plots/history.csv, and logs the run to MLflow (models/run.json
    names it).
    """
    report = run_train(load_settings(params), params=params)
    if report is None:  # one of several training processes, not the first
        return
    m = report.metrics
    typer.echo(
        f"train: best epoch {m['best_epoch']} val_accuracy {m['val_accuracy']} -> {PATHS.model}"
    )


@app.command()
@command(stage=True)
def evaluate(params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Score the model on the test split: metrics/eval.json and plots/ (also in MLflow).

    Accuracy, precision, recall, F1, ROC-AUC and calibration at a threshold chosen on the
    validation split; accuracy per attribute slice; the most confident mistakes.
    """
    e = run_evaluate(load_settings(params)).evaluation
    auc = f"{e.roc_auc:.4f}" if e.roc_auc is not None else "n/a"
    typer.echo(
        f"evaluate: accuracy {e.accuracy:.4f} precision {e.precision:.4f} "
        f"recall {e.recall:.4f} f1 {e.f1:.4f} roc_auc {auc} (threshold "
        f"{e.threshold_calibrated:.3f} on the calibrated P(male) = {e.threshold_raw:.3f} on "
        f"the raw output, chosen on val) -> {PATHS.eval_metrics}, {PATHS.plots}/"
    )


@app.command()
@command(stage=True)
def register(params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Register the model as a version of `gender-classifier`; promote it if it wins.

    Points `challenger` at the new version; moves `champion` only if the test accuracy
    is >= `register.min_accuracy` and beats the champion (evaluated on the same test
    split) by at least `register.min_improvement`. Writes reports/register.json.
    """
    d = run_register(load_settings(params)).decision
    typer.echo(
        f"register: {d.model_name} version {d.version} {d.decision} "
        f"(champion now: version {d.champion_after}). " + "; ".join(d.reasons)
    )


if __name__ == "__main__":  # pragma: no cover - what dvc.yaml runs
    app()
