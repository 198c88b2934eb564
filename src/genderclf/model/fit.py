"""Fitting: the two-phase transfer-learning recipe, resumable after a crash.

`fit_phases(settings, train_ds, val_ds, backup_dir)` trains and returns the best model.
Every completed epoch is backed up, so calling it again after a crash resumes from the
last completed epoch. No file of the stage contract is written here (see
the train stage).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

from genderclf.config import Settings, TrainSettings
from genderclf.model.backbones import build_model, unfreeze_top_blocks

log = logging.getLogger(__name__)

HISTORY_FIELDS = ["epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds"]


@dataclass
class TrainResult:
    model: keras.Model
    history: list[dict[str, Any]]
    resumed_from: str | None = None
    epochs_run_now: int = 0
    seconds: float = 0.0


class EpochLog(keras.callbacks.Callback):
    """One line per epoch on the console, a row in history.csv, the row to `on_epoch`."""

    def __init__(self, phase: int, offset: int, history_csv: Path,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None):  # fmt: skip
        super().__init__()
        self.phase, self.offset, self.history_csv = phase, offset, history_csv
        self.on_epoch = on_epoch
        self._t0 = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._t0 = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = dict(logs or {})
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        row = {
            "epoch": self.offset + epoch + 1, "phase": self.phase, "lr": lr,
            "seconds": round(time.monotonic() - self._t0, 2),
            **{k: round(float(logs[k]), 6) for k in ("loss", "accuracy", "val_loss", "val_accuracy") if k in logs},
        }  # fmt: skip
        new = not self.history_csv.exists()
        with open(self.history_csv, "a", newline="") as f:
            w = csv.DictWriter(f, HISTORY_FIELDS, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)
        print(
            f"phase {self.phase} epoch {row['epoch']}: loss {row.get('loss', float('nan')):.4f} "
            f"acc {row.get('accuracy', float('nan')):.4f} val_loss {row.get('val_loss', float('nan')):.4f} "
            f"val_acc {row.get('val_accuracy', float('nan')):.4f} lr {lr:.2e} ({row['seconds']:.0f}s)",
            flush=True,
        )
        if self.on_epoch is not None:
            self.on_epoch(row)


def read_history(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [
            {k: float(v) if v not in ("", None) else None for k, v in r.items()}
            for r in csv.DictReader(f)
        ]


def _optimizer(name: str, lr: float) -> keras.optimizers.Optimizer:
    if name == "sgd":
        return keras.optimizers.SGD(lr, momentum=0.9)
    if name == "adamw":
        return keras.optimizers.AdamW(lr)
    return keras.optimizers.Adam(lr)


def use_mixed_precision(setting: str) -> bool:
    """`auto` = on when an accelerator is visible to the Keras backend, off on CPU."""
    if setting != "auto":
        return setting == "on"
    return accelerator_count() > 0


def accelerator_count() -> int:
    backend = keras.config.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return len(tf.config.list_physical_devices("GPU"))
    if backend == "jax":
        import jax

        return sum(d.platform in ("gpu", "tpu") for d in jax.devices())
    return 0


def distribution_scope():
    """A `tf.distribute.MirroredStrategy` over all GPUs when more than one is visible."""
    if keras.config.backend() == "tensorflow" and accelerator_count() > 1:
        import tensorflow as tf

        strategy = tf.distribute.MirroredStrategy()
        log.info("training on %d GPUs with MirroredStrategy", strategy.num_replicas_in_sync)
        return strategy.scope()
    return contextlib.nullcontext()


def class_weights(male: int, total: int, setting: str) -> dict[int, float] | None:
    """Balanced class weights when the minority class is under 45% (`train.class_weights`)."""
    if setting == "off" or total == 0 or male in (0, total):
        return None
    female = total - male
    if min(male, female) / total >= 0.45:
        return None
    return {0: total / (2 * female), 1: total / (2 * male)}


def fit_phases(
    settings: Settings,
    train_ds: Any,
    val_ds: Any,
    backup_dir: Path,
    *,
    weights: dict[int, float] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Phase 1 trains the head on a frozen backbone; phase 2 fine-tunes the top blocks.

    Every completed epoch is backed up in `backup_dir`, so calling this again after a
    crash resumes from the last completed epoch (phase 1 is skipped once it finished).

    Returns:
        TrainResult with the best model (lowest validation loss over both phases).
    """
    t: TrainSettings = settings.train
    backup_dir.mkdir(parents=True, exist_ok=True)
    history_csv = backup_dir / "history.csv"
    phase1_done = backup_dir / "phase1_done.weights.h5"
    best = backup_dir / "best.weights.h5"
    resumed = None
    if (backup_dir / "phase1" / "training_metadata.json").exists():
        epoch = json.loads((backup_dir / "phase1" / "training_metadata.json").read_text())["epoch"]
        resumed = f"phase 1 after epoch {epoch}"
    if phase1_done.exists():
        resumed = "phase 2 (phase 1 complete)"
        meta = backup_dir / "phase2" / "training_metadata.json"
        if meta.exists():
            resumed = f"phase 2 after epoch {t.epochs_head + json.loads(meta.read_text())['epoch']}"
    if resumed:
        log.info("resuming training from %s (backup in %s)", resumed, backup_dir)
        print(f"train: resuming from {resumed}", flush=True)

    keras.utils.set_random_seed(settings.base.seed)
    with distribution_scope():
        model = build_model(t, settings.base.image_size)
    loss = keras.losses.BinaryCrossentropy()
    checkpoint_best = keras.callbacks.ModelCheckpoint(
        str(best), monitor="val_loss", save_best_only=True, save_weights_only=True
    )
    epochs_now = 0
    t0 = time.monotonic()

    def callbacks(phase: int, offset: int) -> list[keras.callbacks.Callback]:
        return [
            keras.callbacks.BackupAndRestore(str(backup_dir / f"phase{phase}"), delete_checkpoint=False),
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=t.early_stopping_patience,
                                          restore_best_weights=True),
            keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.3,
                                              patience=t.reduce_lr_patience, min_lr=1e-7),
            checkpoint_best,
            EpochLog(phase, offset, history_csv, on_epoch),
        ]  # fmt: skip

    if t.epochs_head > 0 and not phase1_done.exists():
        with distribution_scope():
            model.compile(_optimizer(t.optimizer, t.lr_head), loss=loss, metrics=["accuracy"])
        h = model.fit(train_ds, validation_data=val_ds, epochs=t.epochs_head,
                      callbacks=callbacks(1, 0), class_weight=weights, shuffle=False, verbose=0)  # fmt: skip
        epochs_now += len(h.epoch)
        model.save_weights(str(phase1_done))
    elif phase1_done.exists():
        model.load_weights(str(phase1_done))

    if t.epochs_finetune > 0:
        # A phase-1 BackupAndRestore that restored a backup leaves its epoch on the model
        # (`_initial_epoch`, Keras 3), and the next fit() starts from it: after a resume,
        # phase 2 would silently skip that many fine-tuning epochs.
        model._initial_epoch = None
        names = unfreeze_top_blocks(model, t)
        log.info("phase 2: %d backbone layers trainable, lr %.1e", len(names), t.lr_finetune)
        with distribution_scope():
            model.compile(_optimizer(t.optimizer, t.lr_finetune), loss=loss, metrics=["accuracy"])
        # Carry the best validation loss of phase 1 so phase 2 only checkpoints real gains.
        prev = [r["val_loss"] for r in read_history(history_csv) if r.get("val_loss") is not None]
        if prev:
            checkpoint_best.best = min(prev)
        h = model.fit(train_ds, validation_data=val_ds, epochs=t.epochs_finetune,
                      callbacks=callbacks(2, t.epochs_head), class_weight=weights, shuffle=False, verbose=0)  # fmt: skip
        epochs_now += len(h.epoch)

    if best.exists():
        model.load_weights(str(best))
    return TrainResult(model, read_history(history_csv), resumed, epochs_now, time.monotonic() - t0)


def backup_dir_for(root: Path, settings: Settings, prepared_meta: dict[str, Any]) -> Path:
    """A backup folder below `root` keyed by the train/base settings and the prepared data.

    A backup from other settings or other data is never resumed by mistake.
    """
    key = json.dumps(
        {"train": settings.train.model_dump(), "base": settings.base.model_dump(),
         "data": prepared_meta}, sort_keys=True, default=str,
    )  # fmt: skip
    return Path(root) / hashlib.sha256(key.encode()).hexdigest()[:16]
