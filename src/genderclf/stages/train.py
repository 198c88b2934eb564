"""The train stage: fine-tune the backbone on the prepared data, resumable after a crash.

Writes `models/model.keras`, `metrics/train.json`, `plots/history.csv` and the training
curves. A backup folder outside DVC's outputs (keyed by the settings and the data) keeps
every completed epoch until the run is logged, so a killed run resumes.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genderclf.config import Paths, Settings
from genderclf.data.tfrecords import (
    PreparedDataError,
    make_dataset,
    read_meta,
    reader_on_cpu_only,
)
from genderclf.io import atomic_file, write_json
from genderclf.model import distributed
from genderclf.model.backbones import check_compatible
from genderclf.model.fit import (
    backup_dir_for,
    check_jit_settings,
    class_weights,
    deterministic_xla_flags,
    fit_phases,
    reproducible,
    use_deterministic,
    use_mixed_precision,
)
from genderclf.model.plots import plot_history
from genderclf.model.saving import save_model

log = logging.getLogger(__name__)


@dataclass
class TrainReport:
    metrics: dict[str, Any]  # what metrics/train.json holds
    history: list[dict[str, Any]]
    model: Any  # the trained keras.Model (also saved to `paths.model`)
    example: Any  # one test image, (1, size, size, 3) float32 RGB 0..255: an input example
    backup: Path
    image_size: int
    resize: str


def prepare(settings: Settings, paths: Paths) -> Path:
    """Check the inputs before anything starts; returns this run's backup folder.

    Raises:
        PreparedDataError: prepared data missing or at another image size.
        ModelConfigError: the backbone cannot take these settings (or the weights file is
            missing, or `train.jit_compile: on` conflicts with `train.deterministic`).
    """
    meta = read_meta(paths.prepared)
    check_compatible(settings.train, settings.base.image_size)
    check_jit_settings(settings.train)
    if int(meta["image_size"]) != settings.base.image_size:
        raise PreparedDataError(
            f"prepared data is {meta['image_size']}px but base.image_size="
            f"{settings.base.image_size}: run `dvc repro augment`"
        )
    return backup_dir_for(paths.train_backups, settings, meta)


def run(
    settings: Settings, paths: Paths, on_epoch: Callable[[dict[str, Any]], None] | None = None
) -> TrainReport | None:
    """Train in two phases (head, then the top blocks); keep the best epoch by val_loss.

    Runs on the Keras backend `KERAS_BACKEND` names (TensorFlow by default, or JAX);
    the `tf.data` reader feeds either. Started as one of `train.processes` processes (by
    `genderclf.model.launch`), it trains on its share of the data and only process 0
    writes the outputs; the others return None.

    Args:
        on_epoch: called with each epoch's history row (epoch, phase, loss, accuracy,
            val_loss, val_accuracy, lr, seconds, images_per_second), e.g. to log it.
    """
    import keras

    t = settings.train
    backup = prepare(settings, paths)
    meta = read_meta(paths.prepared)
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
    for other in paths.train_backups.glob("*"):  # backups of other settings or data
        if other != backup and chief:
            shutil.rmtree(other, ignore_errors=True)
    tr = meta["splits"]["train"]
    weights = class_weights(tr["male"], tr["images"], t.class_weights)
    with reproducible(settings.base.seed, deterministic):
        share: dict[str, Any] = {}
        batch, records = t.batch_size, tr["records"]
        if distributed.current().distributed:  # this process's shards, as many steps as all
            plan = distributed.shard_plan(meta, "train", distributed.current(), t.batch_size)
            share = {"shards": plan.shards, "limit": plan.records_per_epoch}
            batch, records = plan.batch, plan.records_per_epoch * t.processes
        train_ds = make_dataset(
            paths.prepared,
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
        val_ds = make_dataset(paths.prepared, "val", batch)
        result = fit_phases(
            settings,
            train_ds,
            val_ds,
            backup,
            weights=weights,
            on_epoch=on_epoch,
            train_records=records,
            deterministic=deterministic,
        )
    if not chief:  # process 0 holds the same weights and writes every output
        return None
    result.model = distributed.local_model(result.model)  # saved and logged by process 0 alone
    save_model(result.model, paths.model)

    hist = result.history
    best = min(
        (r for r in hist if r.get("val_loss") is not None), key=lambda r: r["val_loss"], default={}
    )
    rate = tr["records"] * result.epochs_run_now / result.seconds if result.epochs_run_now else None
    # The training rate per epoch, compilation and validation excluded (history rows).
    rates = sorted(r["images_per_second"] for r in hist if r.get("images_per_second"))
    steady = rates[len(rates) // 2] if rates else None
    metrics = {
        "best_epoch": int(best.get("epoch", 0)),
        "val_loss": best.get("val_loss"),
        "val_accuracy": best.get("val_accuracy"),
        "epochs": len(hist),
        "train_images_per_second": round(rate, 1) if rate else None,  # whole fit, wall clock
        "images_per_second": steady,  # median epoch: training steps only, no compilation
        "resumed": result.resumed_from or "no",
        "class_weights": weights or "none",
    }
    write_json(paths.train_metrics, metrics)
    with atomic_file(paths.history) as tmp:
        shutil.copyfile(backup / "history.csv", tmp)
    plot_history(hist, paths.curves)
    example = next(iter(make_dataset(paths.prepared, "test", 1)))[0].numpy()
    return TrainReport(
        metrics,
        hist,
        result.model,
        example,
        backup,
        settings.base.image_size,
        settings.augment.resize,
    )


def discard_backup(report: TrainReport) -> None:
    """Remove the run's backup once its results are safe (saved and logged)."""
    shutil.rmtree(report.backup, ignore_errors=True)
