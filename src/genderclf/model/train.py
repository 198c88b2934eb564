"""Training: the two-phase transfer-learning recipe, resumable after a crash.

`fit_phases` is the pure part (settings + datasets -> model + history). `run_train` is
the stage: it reads the prepared data, keeps a backup folder outside DVC's outputs so a
killed run resumes from its last completed epoch, logs to MLflow and writes the outputs
of the stage contract.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras

from genderclf.config import Settings, TrainSettings
from genderclf.model.backbones import build_model, check_compatible, unfreeze_top_blocks

log = logging.getLogger(__name__)

HISTORY_FIELDS = ["epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds"]
BACKUP_ROOT = Path(".cache") / "train"


@dataclass
class TrainResult:
    model: keras.Model
    history: list[dict[str, Any]]
    resumed_from: str | None = None
    images_per_second: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class EpochLog(keras.callbacks.Callback):
    """One line per epoch on the console, a row in history.csv, metrics to MLflow."""

    def __init__(self, phase: int, offset: int, history_csv: Path, mlflow_run: bool):
        super().__init__()
        self.phase, self.offset, self.history_csv, self.mlflow_run = (
            phase,
            offset,
            history_csv,
            mlflow_run,
        )
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
        if self.mlflow_run:
            import mlflow

            try:
                mlflow.log_metrics(
                    {k: v for k, v in row.items() if k not in ("epoch", "phase", "seconds")},
                    step=row["epoch"],
                )
            except Exception as err:  # a tracking hiccup must not kill hours of training
                log.warning("could not log epoch %d to MLflow (%s); it stays in %s",
                            row["epoch"], type(err).__name__, self.history_csv)  # fmt: skip


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
    mlflow_run: bool = False,
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
            EpochLog(phase, offset, history_csv, mlflow_run),
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
    elapsed = time.monotonic() - t0
    return TrainResult(model, read_history(history_csv), resumed, extra={"epochs_run_now": epochs_now,
                                                                          "seconds": elapsed})  # fmt: skip


def backup_dir_for(settings: Settings, prepared_meta: dict[str, Any]) -> Path:
    """A backup folder keyed by the train/base settings and the prepared data.

    A backup from other settings or other data is never resumed by mistake.
    """
    key = json.dumps(
        {"train": settings.train.model_dump(), "base": settings.base.model_dump(),
         "data": prepared_meta}, sort_keys=True, default=str,
    )  # fmt: skip
    return BACKUP_ROOT / hashlib.sha256(key.encode()).hexdigest()[:16]


def save_model_atomic(model: keras.Model, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    model.save(str(tmp))
    os.replace(tmp, path)


def plot_history(history: list[dict[str, Any]], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
        ax.plot(ep, [r.get(key) for r in history], "o-", label=f"train {key}")
        ax.plot(ep, [r.get(f"val_{key}") for r in history], "s-", label=f"val {key}")
        switch = [r["epoch"] for r in history if r["phase"] == 2]
        if switch and len(switch) < len(ep):
            ax.axvline(min(switch) - 0.5, color="grey", ls="--", lw=1, label="fine-tune starts")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def run_train(settings: Settings, prepared_dir: Path, paths: dict[str, Path]) -> dict[str, Any]:
    """The train stage. `paths` holds model, run, metrics, history, curves, params, source.

    Returns:
        The metrics written to `metrics/train.json`.

    Raises:
        PreparedDataError: prepared data missing (run `dvc repro augment`).
        ModelConfigError: the backbone cannot take these settings.
        TrackingError: MLflow unreachable (checked before training; after training the
            model stays on disk).
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    from genderclf.data.tfrecords import make_dataset, read_meta
    from genderclf.tracking.setup import TrackingError, configure, lineage_tags, redact

    meta = read_meta(prepared_dir)
    t = settings.train
    check_compatible(t, settings.base.image_size)
    if int(meta["image_size"]) != settings.base.image_size:
        raise FileNotFoundError(
            f"prepared data is {meta['image_size']}px but base.image_size={settings.base.image_size}: "
            "run `dvc repro augment`"
        )
    uri = configure()
    if use_mixed_precision(t.mixed_precision):
        keras.mixed_precision.set_global_policy("mixed_float16")
    backup = backup_dir_for(settings, meta)
    for other in BACKUP_ROOT.glob("*"):
        if other != backup:
            shutil.rmtree(other, ignore_errors=True)
    run_file = backup / "mlflow_run_id"
    run_id = run_file.read_text().strip() if run_file.exists() else None
    train_ds = make_dataset(
        prepared_dir, "train", t.batch_size, shuffle=True, seed=settings.base.seed
    )
    val_ds = make_dataset(prepared_dir, "val", t.batch_size)
    tr = meta["splits"]["train"]
    weights = class_weights(tr["male"], tr["images"], t.class_weights)

    run = mlflow.start_run(run_id=run_id or os.environ.get("MLFLOW_RUN_ID"))
    saved = False
    try:
        backup.mkdir(parents=True, exist_ok=True)
        run_file.write_text(run.info.run_id)
        if run_id is None:
            mlflow.log_params({k: str(v)[:500] for k, v in settings.flat().items()})
        mlflow.set_tags(lineage_tags(paths["params"], paths["source"], str(prepared_dir)))
        mlflow.set_tag("stage.train", "running")
        result = fit_phases(settings, train_ds, val_ds, backup, weights=weights, mlflow_run=True)
        model = result.model
        save_model_atomic(model, paths["model"])
        saved = True
        hist = result.history
        best = min((r for r in hist if r.get("val_loss") is not None), key=lambda r: r["val_loss"],
                   default={})  # fmt: skip
        n_records = tr["records"]
        epochs_now = result.extra["epochs_run_now"]
        metrics = {
            "best_epoch": int(best.get("epoch", 0)),
            "val_loss": best.get("val_loss"),
            "val_accuracy": best.get("val_accuracy"),
            "epochs": len(hist),
            "train_images_per_second": round(n_records * epochs_now / result.extra["seconds"], 1)
            if epochs_now else None,
            "resumed": result.resumed_from or "no",
            "class_weights": weights or "none",
        }  # fmt: skip
        from genderclf.data.fsutil import write_json

        write_json(paths["metrics"], metrics)
        paths["history"].parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(backup / "history.csv", paths["history"])
        plot_history(hist, paths["curves"])
        mlflow.log_metrics({f"best_{k}": v for k, v in metrics.items()
                            if isinstance(v, (int, float)) and v is not None})  # fmt: skip
        mlflow.log_artifact(str(paths["curves"]), "plots")
        mlflow.log_artifact(str(paths["history"]), "plots")
        keras_uri = log_keras_model(model, settings.base.image_size)
        # The servable pyfunc model (`runs:/<id>/model`) is logged by register, which knows
        # evaluation's threshold; run.json carries what it needs to package this one.
        write_json(paths["run"], {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                                  "tracking_uri": uri, "keras_model_uri": keras_uri,
                                  "image_size": settings.base.image_size,
                                  "resize": settings.augment.resize})  # fmt: skip
        mlflow.set_tag("stage.train", "done")
    except (MlflowException, RequestException) as err:
        # The server went away after `configure()` answered (MLflow's HTTP client has already
        # retried). Say so in one message; the backup stays, so a re-run repeats no epoch.
        with contextlib.suppress(MlflowException, RequestException):
            mlflow.end_run("FAILED")  # pops the active run even when the server is down
        kept = (f"the trained model is kept in {paths['model']}" if saved
                else f"completed epochs are kept in {backup}")  # fmt: skip
        raise TrackingError(
            f"MLflow tracking server at {uri} failed during the train stage: "
            f"{redact(str(err))[:300]}. {kept}; run the stage again when the server answers "
            "(it resumes from the backup without repeating completed epochs)."
        ) from None
    finally:
        mlflow.end_run()
    shutil.rmtree(backup, ignore_errors=True)
    return metrics


def log_keras_model(model: keras.Model, image_size: int) -> str:
    """Log the model to the active run (MLflow Keras flavor) with a signature and an input example.

    Returns:
        The model URI (`runs:/<run_id>/keras_model`).
    """
    import tempfile

    import mlflow
    import numpy as np
    from mlflow.models import infer_signature

    example = np.zeros((1, image_size, image_size, 3), dtype=np.float32)
    signature = infer_signature(example, model.predict(example, verbose=0))
    with tempfile.TemporaryDirectory() as tmp:
        # mlflow.keras.log_model (MLflow 3.17) writes the input example before creating its
        # folder and fails; saving into an existing folder and logging that works around it.
        local = Path(tmp) / "model"
        local.mkdir()
        mlflow.keras.save_model(model, str(local), signature=signature, input_example=example,
                                pip_requirements=runtime_requirements())  # fmt: skip
        mlflow.log_artifacts(str(local), "keras_model")
    return f"runs:/{mlflow.active_run().info.run_id}/keras_model"


def runtime_requirements() -> list[str]:
    """Pinned requirements for serving the logged model (instead of MLflow's slow inference)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in (
        "keras",
        "numpy",
        keras.config.backend() if keras.config.backend() != "tensorflow" else "tensorflow",
    ):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            continue
    return reqs
