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
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

from genderclf.config import Settings, TrainSettings
from genderclf.model import distributed
from genderclf.model.backbones import (
    Backbone,
    ModelConfigError,
    build_model,
    unfreeze_top_blocks,
)

log = logging.getLogger(__name__)

HISTORY_FIELDS = [
    "epoch",
    "phase",
    "loss",
    "accuracy",
    "val_loss",
    "val_accuracy",
    "lr",
    "seconds",
    "images_per_second",
]
# Kept in the backup's history (and logged to MLflow and the console), never in an output
# DVC hashes: the same inputs must give the same bytes however fast the machine is.
TIMING_FIELDS = ("seconds", "images_per_second")


@dataclass
class TrainResult:
    model: keras.Model
    history: list[dict[str, Any]]
    resumed_from: str | None = None
    epochs_run_now: int = 0
    seconds: float = 0.0


class EpochLog(keras.callbacks.Callback):
    """One line per epoch on the console, a row in history.csv, the row to `on_epoch`.

    `images_per_second` is the training rate of the epoch: the `records` images of the
    train split over the time from the epoch's start to its last training step (validation
    excluded). In the first epoch of a `fit` (the one that compiles the step) the clock
    starts after the first step instead, and that step's `batch_size` images are not
    counted. None when that leaves nothing to time (one step per epoch) or `records` is
    unknown. Keras' own callbacks (BackupAndRestore, ModelCheckpoint) already hook every
    batch end, so Keras syncs each step with the host: the clock reads finished steps.
    """

    def __init__(
        self,
        phase: int,
        offset: int,
        history_csv: Path,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        records: int | None = None,
        batch_size: int | None = None,
        quiet: bool = False,
    ):
        super().__init__()
        self.phase, self.offset, self.history_csv = phase, offset, history_csv
        self.quiet = quiet  # no console line (a distributed process other than the chief)
        self.on_epoch = on_epoch
        self.records, self.batch_size = records, batch_size
        self._t0 = self._t_first = self._t_last = 0.0
        self._compiled = False  # the first epoch of this fit() compiles the training step

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._t0 = self._t_first = self._t_last = time.monotonic()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._t_last = time.monotonic()
        if batch == 0:
            self._t_first = self._t_last

    def _images_per_second(self) -> float | None:
        if not self.records:
            return None
        if self._compiled:
            images, seconds = self.records, self._t_last - self._t0
        else:  # exclude the first step: compilation
            self._compiled = True
            images = self.records - min(self.batch_size or self.records, self.records)
            seconds = self._t_last - self._t_first
        return round(images / seconds, 1) if images > 0 and seconds > 0 else None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = dict(logs or {})
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        row = {
            "epoch": self.offset + epoch + 1,
            "phase": self.phase,
            "lr": lr,
            "seconds": round(time.monotonic() - self._t0, 2),
            "images_per_second": self._images_per_second(),
            **{
                k: round(float(logs[k]), 6)
                for k in ("loss", "accuracy", "val_loss", "val_accuracy")
                if k in logs
            },
        }
        new = not self.history_csv.exists()
        with open(self.history_csv, "a", newline="") as f:
            w = csv.DictWriter(f, HISTORY_FIELDS, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)
        nan = float("nan")
        if self.quiet:
            if self.on_epoch is not None:
                self.on_epoch(row)
            return
        print(
            f"phase {self.phase} epoch {row['epoch']}: loss {row.get('loss', nan):.4f} "
            f"acc {row.get('accuracy', nan):.4f} val_loss {row.get('val_loss', nan):.4f} "
            f"val_acc {row.get('val_accuracy', nan):.4f} lr {lr:.2e} ({row['seconds']:.0f}s"
            + (f", {row['images_per_second']:.0f} img/s)" if row["images_per_second"] else ")"),
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


def xla_blockers(model: keras.Model) -> list[str]:
    """Names of the layers (nested models included) that set `supports_jit = False`."""
    blockers, stack = [], [model]
    while stack:
        layer = stack.pop()
        if not getattr(layer, "supports_jit", True):
            blockers.append(layer.name)
        stack.extend(getattr(layer, "layers", None) or [])
    return blockers


def use_jit_compile(setting: str, model: keras.Model, deterministic: bool) -> bool:
    """`train.jit_compile` resolved for `model.compile(jit_compile=...)`.

    `auto` = XLA on whenever the model supports it and a GPU is visible, one or several
    (Keras' own "auto" turns XLA off on CPU hosts and under any tf.distribute strategy,
    i.e. on every multi-GPU TensorFlow worker), and always on the JAX backend. TensorFlow
    refuses XLA with op determinism on, so `auto` is off there and `on` is an error.

    Raises:
        ModelConfigError: `on` for a model or setting that cannot compile under XLA.
    """
    if setting == "off":
        return False
    blockers = xla_blockers(model)
    tf_determinism = deterministic and keras.config.backend() == "tensorflow"
    if setting == "on" and (blockers or tf_determinism):
        why = (
            f"layers {blockers} do not support XLA"
            if blockers
            else "Keras turns XLA off on the TensorFlow backend when op determinism is on "
            "(train.deterministic)"
        )
        raise ModelConfigError(
            f"train.jit_compile=on but {why}: set train.jit_compile: auto or "
            "off, or train.deterministic: off"
        )
    if blockers or tf_determinism:
        return False
    # On JAX, no XLA means running op by op: several times slower on a CPU too.
    return setting == "on" or keras.config.backend() == "jax" or accelerator_count() > 0


def check_jit_settings(train: TrainSettings) -> None:
    """Fail early on `train.jit_compile: on` that TensorFlow's op determinism would undo.

    Raises:
        ModelConfigError: naming both keys.
    """
    if (
        train.jit_compile == "on"
        and keras.config.backend() == "tensorflow"
        and use_deterministic(train.deterministic)
    ):
        raise ModelConfigError(
            f"train.jit_compile=on but train.deterministic={train.deterministic} turns op "
            "determinism on, and Keras turns XLA off on the TensorFlow backend then: set "
            "train.deterministic: off (or train.jit_compile: auto)"
        )


def use_deterministic(setting: str) -> bool:
    """`train.deterministic`: `auto` = on without an accelerator, off with one."""
    if setting != "auto":
        return setting == "on"
    return accelerator_count() == 0


@contextlib.contextmanager
def reproducible(seed: int, on: bool):
    """Seed Python, NumPy and the backend; with `on`, also make the ops deterministic.

    TensorFlow's op determinism (deterministic kernels, and `tf.data` transformations that
    keep their order) is switched on for the block and back off after it (it is process
    wide). On the JAX backend, XLA on a GPU needs `--xla_gpu_deterministic_ops=true` in
    `XLA_FLAGS` before JAX starts: `deterministic_xla_flags()`; JAX on a CPU is
    deterministic as it is.
    """
    keras.utils.set_random_seed(seed)
    if not on:
        yield
        return
    from tensorflow.python.framework import config as tf_config  # tf.data runs on every backend

    was_on = tf_config.is_op_determinism_enabled()
    tf_config.enable_op_determinism()
    try:
        yield
    finally:
        if not was_on:
            tf_config.disable_op_determinism()


def deterministic_xla_flags(setting: str) -> None:
    """With `train.deterministic: on` on the JAX backend, ask XLA for deterministic GPU ops.

    Must run before JAX initialises its backend (the first device query); `auto` is off
    on a GPU, so only `on` sets the flag. Deterministic XLA:GPU has no deterministic
    select-and-scatter (the gradient of max pooling): compilation may fail there.
    """
    if setting != "on" or keras.config.backend() != "jax":
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_deterministic_ops" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_deterministic_ops=true".strip()


def distribution_scope():
    """A `tf.distribute.MirroredStrategy` over all GPUs when more than one is visible."""
    if keras.config.backend() == "tensorflow" and accelerator_count() > 1:
        import tensorflow as tf

        strategy = tf.distribute.MirroredStrategy()
        log.info("training on %d GPUs with MirroredStrategy", strategy.num_replicas_in_sync)
        return strategy.scope()
    return contextlib.nullcontext()


class RestoreOnly(keras.callbacks.BackupAndRestore):
    """BackupAndRestore for the processes other than the chief in distributed training:
    restores from the chief's backup, then saves into a folder of its own.

    Every process must run the same callbacks doing the same work (a save or a load the
    chief alone did put the processes' collectives out of step: gloo aborted with
    "collective mismatch"), but N writers of one file on a share would corrupt it.
    """

    def __init__(self, read_dir: str, write_dir: str):
        super().__init__(read_dir, delete_checkpoint=False)
        self.write_dir = write_dir

    def on_train_begin(self, logs: dict | None = None) -> None:
        super().on_train_begin(logs)
        self.backup_dir = self.write_dir
        self._weights_path = os.path.join(self.write_dir, "latest.weights.h5")
        self._training_metadata_path = os.path.join(self.write_dir, "training_metadata.json")


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
    image_size: int,
    backbone: Backbone | None = None,
    weights: dict[int, float] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    train_records: int | None = None,
    deterministic: bool = False,
) -> TrainResult:
    """Phase 1 trains the head on a frozen backbone; phase 2 fine-tunes the top blocks.

    Every completed epoch is backed up in `backup_dir`, so calling this again after a
    crash resumes from the last completed epoch (phase 1 is skipped once it finished).
    `image_size` is the prepared data's (the model's input); `backbone` what
    `check_compatible` returned for it. `train_records` (images per epoch) gives each
    history row its `images_per_second`; `deterministic` is `train.deterministic` resolved
    (it decides whether XLA can be on).

    Returns:
        TrainResult with the best model (lowest validation loss over both phases).
    """
    t: TrainSettings = settings.train
    backup_dir.mkdir(parents=True, exist_ok=True)
    chief = distributed.is_chief()
    # Only the chief writes in backup_dir; the others do the same work into a folder of
    # their own (see RestoreOnly) and read the chief's backup when they resume.
    own = backup_dir if chief else backup_dir / f"process-{distributed.current().process_id}"
    own.mkdir(parents=True, exist_ok=True)
    history_csv = own / "history.csv"
    phase1_done = backup_dir / "phase1_done.weights.h5"
    best = own / "best.weights.h5"
    resumed = None
    if (backup_dir / "phase1" / "training_metadata.json").exists():
        epoch = json.loads((backup_dir / "phase1" / "training_metadata.json").read_text())["epoch"]
        resumed = f"phase 1 after epoch {epoch}"
    if phase1_done.exists():
        resumed = "phase 2 (phase 1 complete)"
        meta = backup_dir / "phase2" / "training_metadata.json"
        if meta.exists():
            resumed = f"phase 2 after epoch {t.epochs_head + json.loads(meta.read_text())['epoch']}"
    if resumed and chief:
        log.info("resuming training from %s (backup in %s)", resumed, backup_dir)
        print(f"train: resuming from {resumed}", flush=True)

    keras.utils.set_random_seed(settings.base.seed)
    with distribution_scope():
        model = build_model(t, image_size, backbone)
    jit = use_jit_compile(t.jit_compile, model, deterministic)
    print(
        f"train: backend {keras.config.backend()}, XLA {'on' if jit else 'off'}, "
        f"policy {keras.config.dtype_policy().name}, deterministic "
        f"{'on' if deterministic else 'off'}",
        flush=True,
    )
    loss = keras.losses.BinaryCrossentropy()
    checkpoint_best = keras.callbacks.ModelCheckpoint(
        str(best), monitor="val_loss", save_best_only=True, save_weights_only=True
    )
    epochs_now = 0
    t0 = time.monotonic()

    def callbacks(phase: int, offset: int) -> list[keras.callbacks.Callback]:
        shared = str(backup_dir / f"phase{phase}")
        # The same callbacks in every process (the logs are the all-reduced metrics, so
        # early stopping and the learning rate agree everywhere).
        return [
            keras.callbacks.BackupAndRestore(shared, delete_checkpoint=False)
            if chief
            else RestoreOnly(shared, str(own / f"phase{phase}")),
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=t.early_stopping_patience, restore_best_weights=True
            ),
            keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss", factor=0.3, patience=t.reduce_lr_patience, min_lr=1e-7
            ),
            checkpoint_best,
            EpochLog(
                phase,
                offset,
                history_csv,
                on_epoch if chief else None,
                train_records,
                t.batch_size,
                quiet=not chief,
            ),
        ]

    if t.epochs_head > 0 and not phase1_done.exists():
        with distribution_scope():
            model.compile(
                _optimizer(t.optimizer, t.lr_head), loss=loss, metrics=["accuracy"], jit_compile=jit
            )
        h = model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=t.epochs_head,
            callbacks=callbacks(1, 0),
            class_weight=weights,
            shuffle=False,
            verbose=0,
        )
        epochs_now += len(h.epoch)
        model.save_weights(str(phase1_done if chief else own / phase1_done.name))
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
            model.compile(
                _optimizer(t.optimizer, t.lr_finetune),
                loss=loss,
                metrics=["accuracy"],
                jit_compile=jit,
            )
        # Carry the best validation loss of phase 1 so phase 2 only checkpoints real gains.
        prev = [r["val_loss"] for r in read_history(history_csv) if r.get("val_loss") is not None]
        if prev:
            checkpoint_best.best = min(prev)
        h = model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=t.epochs_finetune,
            callbacks=callbacks(2, t.epochs_head),
            class_weight=weights,
            shuffle=False,
            verbose=0,
        )
        epochs_now += len(h.epoch)

    if best.exists():
        model.load_weights(str(best))
    return TrainResult(model, read_history(history_csv), resumed, epochs_now, time.monotonic() - t0)


def write_history(backup_csv: Path, out_csv: Path) -> Path:
    """The backup's history without its timings (`TIMING_FIELDS`), atomically: the
    `plots/history.csv` DVC hashes, equal for equal training whatever the machine's speed."""
    from genderclf.io import atomic_file

    keep = [f for f in HISTORY_FIELDS if f not in TIMING_FIELDS]
    with open(backup_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    with atomic_file(out_csv) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, keep, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return out_csv


def backup_dir_for(root: Path, settings: Settings, prepared_meta: dict[str, Any]) -> Path:
    """A backup folder below `root` keyed by the train/base settings and the prepared data.

    A backup from other settings or other data is never resumed by mistake.
    """
    key = json.dumps(
        {
            "train": settings.train.model_dump(),
            "base": settings.base.model_dump(),
            "data": prepared_meta,
        },
        sort_keys=True,
        default=str,
    )
    return Path(root) / hashlib.sha256(key.encode()).hexdigest()[:16]
