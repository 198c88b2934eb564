"""The train stage: fine-tune the backbone on the prepared data, resumable after a crash.

Writes `models/model.keras` with `models/model.json` (`contracts.TrainedModel`: its input
size and resize mode, from the prepared data), `metrics/train.json`, `plots/history.csv`
and the training curves. A backup folder outside DVC's outputs (keyed by the settings and
the data) keeps every completed epoch until the run is logged, so a killed run resumes.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genderclf.config import Paths, Settings
from genderclf.contracts import ModelInput, PreparedData, PreparedDataError, TrainedModel
from genderclf.data.tfrecords import make_dataset, reader_on_cpu_only
from genderclf.io import md5_file, write_json
from genderclf.model import distributed
from genderclf.model.backbones import Backbone, check_compatible
from genderclf.model.fit import (
    backup_dir_for,
    check_jit_settings,
    class_weights,
    deterministic_xla_flags,
    fit_phases,
    reproducible,
    use_deterministic,
    use_mixed_precision,
    write_history,
)
from genderclf.model.plots import plot_history
from genderclf.model.saving import save_model
from genderclf.model.tuned import effective_settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainPlan:
    """What `prepare` checked before anything starts."""

    # the settings this training uses: params.yaml's, or with `tune.enabled` its train.*
    # values replaced by the search's (params/tuned.yaml); models/model.json records them
    settings: Settings
    data: PreparedData  # data/prepared/meta.json, read once
    backbone: Backbone  # train.backbone, checked against the data's image size
    backup: Path  # this run's backup folder (resumes a killed run of the same settings)


@dataclass
class TrainReport:
    metrics: dict[str, Any]  # what metrics/train.json holds (no timings)
    timings: dict[str, float | None]  # training rates: for MLflow and the console only
    history: list[dict[str, Any]]
    model: Any  # the trained keras.Model (also saved to `paths.model`)
    trained: TrainedModel  # what models/model.json holds
    example: Any  # one test image, (1, size, size, 3) float32 RGB 0..255: an input example
    backup: Path


def prepare(settings: Settings, paths: Paths) -> TrainPlan:
    """Check the inputs before anything starts (once per training).

    With `tune.enabled` the train values are the tune stage's (`params/tuned.yaml`): the
    plan's `settings` are what the training uses.

    Raises:
        TunedParamsError: tuning is on and params/tuned.yaml is missing or does not fit.
        PreparedDataError: prepared data missing or at another image size.
        ModelConfigError: the backbone cannot take these settings (or the weights file is
            missing, or `train.jit_compile: on` conflicts with `train.deterministic`).
    """
    settings = effective_settings(settings, paths)
    data = PreparedData.read(paths.prepared)
    # The settings first (a backbone that cannot take base.image_size is named as such),
    # then the data: from here on the image size is the prepared data's.
    backbone = check_compatible(settings.train, settings.base.image_size)
    check_jit_settings(settings.train)
    if data.image_size != settings.base.image_size:
        raise PreparedDataError(
            f"prepared data is {data.image_size}px but base.image_size="
            f"{settings.base.image_size}: run `dvc repro augment`"
        )
    # The backup root may be a share every host of a distributed training reads.
    root = distributed.backup_root(paths.train_backups)
    return TrainPlan(settings, data, backbone, backup_dir_for(root, settings, data.to_json()))


def process(settings: Settings) -> distributed.Cluster | None:
    """This process's place in a training of `train.processes` processes, or None when no
    launcher started it (it trains alone, or it launches the processes: `launch`).

    Raises:
        DistributedError: the launcher's variables are incomplete, started another number
            of processes, or the JAX backend is not there for `train.processes` > 1.
    """
    cluster = distributed.from_env()
    distributed.check(settings.train, cluster)
    return cluster


def launch(settings: Settings, paths: Paths, params: Path, plan: TrainPlan) -> Any:
    """Start the `train.processes` processes here or on the Ray cluster (`model.launch`),
    each running the stage's command, and wait for them. Returns a LaunchReport with the
    metrics process 0 wrote.

    Raises:
        DistributedError: a process failed (one line: which, how, how to resume).
    """
    from genderclf.model import launch as launcher

    return launcher.run(settings, paths, params, plan.backup)


def one_of(cluster: distributed.Cluster | None) -> contextlib.AbstractContextManager:
    """Around the work of one process of a distributed training: any error ends the process
    at once (`distributed.exit_on_error`), so the others stop instead of waiting for it."""
    return distributed.exit_on_error() if cluster else contextlib.nullcontext()


def run(
    settings: Settings,
    paths: Paths,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    plan: TrainPlan | None = None,
) -> TrainReport | None:
    """Train in two phases (head, then the top blocks); keep the best epoch by val_loss.

    Runs on the Keras backend `KERAS_BACKEND` names (TensorFlow by default, or JAX);
    the `tf.data` reader feeds either. Every output DVC hashes (the model, model.json,
    train.json, history.csv, the curves) is the same for the same inputs when
    `train.deterministic` is on: timings go to the report, not to the files. Started as
    one of `train.processes` processes (by `genderclf.model.launch`), it trains on its
    share of the data and only process 0 writes the outputs; the others return None.

    Args:
        on_epoch: called with each epoch's history row (epoch, phase, loss, accuracy,
            val_loss, val_accuracy, lr, seconds, images_per_second), e.g. to log it.
        plan: what `prepare` returned (it runs here when the caller did not); its
            `settings` (with the tuned train values when `tune.enabled`) are the ones used.
    """
    import keras

    plan = plan or prepare(settings, paths)
    settings = plan.settings
    t = settings.train
    data = plan.data
    deterministic_xla_flags(t.deterministic)  # before the backend first lists its devices
    cluster = distributed.from_env()
    distributed.check(t, cluster, keras.config.backend())
    distributed.initialize(cluster or distributed.Cluster())  # a no-op for one process
    if keras.config.backend() != "tensorflow":
        reader_on_cpu_only()
    if use_mixed_precision(t.mixed_precision):
        keras.mixed_precision.set_global_policy("mixed_float16")
    deterministic = use_deterministic(t.deterministic)
    chief = distributed.is_chief()
    for other in plan.backup.parent.glob("*"):  # backups of other settings or data
        if other != plan.backup and chief:
            shutil.rmtree(other, ignore_errors=True)
    tr = data.split("train")
    weights = class_weights(tr.male, tr.images, t.class_weights)
    with reproducible(settings.base.seed, deterministic):
        share: dict[str, Any] = {}
        batch, records = t.batch_size, tr.records
        if distributed.current().distributed:  # this process's shards, as many steps as all
            mine = distributed.shard_plan(data, "train", distributed.current(), t.batch_size)
            share = {"shards": mine.shards, "limit": mine.records_per_epoch}
            batch, records = mine.batch, mine.records_per_epoch * t.processes
        train_ds = make_dataset(
            data,
            "train",
            batch,
            shuffle=True,
            seed=settings.base.seed,
            deterministic=deterministic,
            drop_remainder=bool(share),
            **share,
        )
        # Validation is not split: every process scores the whole split (its metrics are the
        # one-process ones), with the same batches, so the processes stay in step.
        val_ds = make_dataset(data, "val", batch)
        result = fit_phases(
            settings,
            train_ds,
            val_ds,
            plan.backup,
            image_size=data.image_size,
            backbone=plan.backbone,
            weights=weights,
            on_epoch=on_epoch,
            train_records=records,
            deterministic=deterministic,
        )
    if not chief:  # process 0 holds the same weights and writes every output
        return None
    result.model = distributed.local_model(result.model)  # saved and logged by process 0 alone
    save_model(result.model, paths.model)
    trained = TrainedModel(
        input=ModelInput(data.image_size, data.resize),
        model_md5=md5_file(paths.model),
        seed=settings.base.seed,
        train=t.model_dump(),
    )
    trained.write(paths.model_info)

    hist = result.history
    best = min(
        (r for r in hist if r.get("val_loss") is not None), key=lambda r: r["val_loss"], default={}
    )
    rate = records * result.epochs_run_now / result.seconds if result.epochs_run_now else None
    # The training rate per epoch, compilation and validation excluded (history rows).
    rates = sorted(r["images_per_second"] for r in hist if r.get("images_per_second"))
    metrics = {
        "best_epoch": int(best.get("epoch", 0)),
        "val_loss": best.get("val_loss"),
        "val_accuracy": best.get("val_accuracy"),
        "epochs": len(hist),
        "resumed": result.resumed_from or "no",
        "class_weights": weights or "none",
    }
    timings = {
        "train_images_per_second": round(rate, 1) if rate else None,  # whole fit, wall clock
        "images_per_second": rates[len(rates) // 2] if rates else None,  # median epoch
    }
    write_json(paths.train_metrics, metrics)
    write_history(plan.backup / "history.csv", paths.history)
    plot_history(hist, paths.curves)
    example = next(iter(make_dataset(data, "test", 1)))[0].numpy()
    log.info(
        "train: %s images/s over the whole fit, %s per epoch (median)",
        timings["train_images_per_second"],
        timings["images_per_second"],
    )
    return TrainReport(metrics, timings, hist, result.model, trained, example, plan.backup)


def discard_backup(report: TrainReport) -> None:
    """Remove the run's backup once its results are safe (saved and logged)."""
    shutil.rmtree(report.backup, ignore_errors=True)
