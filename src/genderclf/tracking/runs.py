"""MLflow runs: the training run (params, lineage, datasets, per-epoch curves, the model as
an MLflow 3 LoggedModel), the evaluation logged into it, and the run a Prefect flow run
opens for its stages.

Metric keys are namespaced so the MLflow UI groups them into sections: `train/...` and
`val/...` per epoch (step = epoch), `test/...` from evaluate, and the accuracy of each
attribute slice as `slice/<attribute>:yes` / `slice/<attribute>:no` (the UI makes a section
of everything before a key's last `/`, so one `slice` section holds them all; the slice's
name is spelt the same everywhere: `model.scoring.slice_name`). One-off facts of a
training (best epoch, epochs run, class weights, its speed) are params of the logged
model, not charts. The keys of `metrics/*.json`, which
DVC shows, stay as they are.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from genderclf.catalog import location
from genderclf.config import Paths, Settings
from genderclf.contracts import (
    ContractError,
    Evaluation,
    PreparedData,
    TrainedModel,
    TrainingRun,
)
from genderclf.model.scoring import slice_name
from genderclf.tracking.setup import (
    EXPERIMENT,
    TrackingError,
    configure,
    dvc_out_hash,
    lineage_tags,
    redact,
    tracking_uri,
)

log = logging.getLogger(__name__)

# The training run's tags that find it again from the model file alone (`training_run`):
# the MD5 of models/model.keras (DVC's hash of it) and the LoggedModel of the Keras model.
MODEL_MD5_TAG = "genderclf.model_md5"
KERAS_MODEL_ID_TAG = "genderclf.keras_model_id"
# A Prefect flow run hands its MLflow run to the stage processes it starts through
# MLflow's own variable (flows/pipeline.py sets it); `flow_run_id` is its one reader.
RUN_ID_VARIABLE = "MLFLOW_RUN_ID"


def flow_run_id() -> str | None:
    """The MLflow run a Prefect flow run opened for its stages, if this process has one."""
    return os.environ.get(RUN_ID_VARIABLE) or None


KERAS_MODEL = "keras_model"  # the LoggedModel name of the trained Keras model
EPOCH_KEYS = {
    "loss": "train/loss",
    "accuracy": "train/accuracy",
    "val_loss": "val/loss",
    "val_accuracy": "val/accuracy",
    "lr": "train/lr",
    "images_per_second": "train/images_per_second",
}


def _tracking_failures():
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    return (MlflowException, RequestException)


def rounded(value: float) -> float:
    """A metric value to 6 significant digits (`lr` 0.0003, not 0.0003000000142492354)."""
    return float(f"{float(value):.6g}")


class TrainingTracker:
    """The MLflow run of one training, as a context manager around the train stage.

    Entering checks the tracking server (before any epoch is spent), starts the run or
    resumes the one a killed training left in its backup folder (or adopts the run of a
    Prefect flow run, `flow_run_id`), and logs the params, lineage tags and datasets. A
    tracking failure inside the block is reported as one TrackingError that says what was
    kept.
    """

    def __init__(self, settings: Settings, paths: Paths, backup: Path, data: PreparedData):
        # `data`: the prepared data's contract the stage already read (meta.json once)
        self.settings, self.paths, self.backup, self.data = settings, paths, backup, data
        self.uri = ""
        self.run_id = ""
        self.saved = False

    def __enter__(self) -> TrainingTracker:
        import mlflow

        self.uri = configure()
        run_file = self.backup / "mlflow_run_id"
        resumed = run_file.read_text().strip() if run_file.exists() else None
        try:
            run = mlflow.start_run(run_id=resumed or flow_run_id())
            self.run_id = run.info.run_id
            self.backup.mkdir(parents=True, exist_ok=True)
            run_file.write_text(self.run_id)
            if resumed is None:
                mlflow.log_params({k: str(v)[:500] for k, v in self.settings.flat().items()})
                # the size of the validation split: `compare --backbones` gives an interval
                val = self.data.split("val").images
                mlflow.log_param("data.val_images", str(val))
            t = self.settings.train
            mlflow.set_tags(
                {
                    **lineage_tags(
                        self.paths.params, self.paths.source_file, str(self.paths.prepared)
                    ),
                    "stage.train": "running",
                    "mlflow.note.content": (
                        f"Training of {t.backbone} ({t.weights or 'from scratch'}) at "
                        f"{self.settings.base.image_size}px on {self._source_name()}: "
                        f"{t.epochs_head} head + {t.epochs_finetune} fine-tune epochs. "
                        "The evaluate and register stages log into this run too."
                    ),
                }
            )
            for split in ("train", "val", "test"):
                log_dataset(self.paths, split)
        except _tracking_failures() as err:
            self._fail(err)
        return self

    def _source_name(self) -> str:
        return location(_source(self.paths))[0]

    def log_epoch(self, row: dict[str, Any]) -> None:
        """One epoch's history row as `train/` and `val/` metrics at step `epoch`; never
        fails the training."""
        import mlflow

        metrics = {
            EPOCH_KEYS[k]: rounded(v) for k, v in row.items() if k in EPOCH_KEYS and v is not None
        }
        try:
            mlflow.log_metrics(metrics, step=int(row["epoch"]))
        except Exception as err:  # a tracking hiccup must not kill hours of training
            log.warning(
                "could not log epoch %d to MLflow (%s); it stays in %s",
                row["epoch"],
                type(err).__name__,
                self.paths.history,
            )

    def log_training(self, report: Any) -> None:
        """The train stage's report: the curves, the Keras model (a LoggedModel, with the
        summary of the training and its timings as its params), the tags that find the run
        from the model file, and models/run.json (`contracts.TrainingRun`)."""
        import mlflow

        self.saved = True
        mlflow.log_artifact(str(self.paths.curves), "plots")
        mlflow.log_artifact(str(self.paths.history), "plots")
        m = report.metrics
        summary = {
            "best_epoch": m["best_epoch"],
            "best_val_loss": m["val_loss"],
            "best_val_accuracy": m["val_accuracy"],
            "epochs": m["epochs"],
            "resumed": m["resumed"],
            "class_weights": m["class_weights"],
            **report.timings,  # train_images_per_second, images_per_second
        }
        info = log_keras_model(
            report.model, report.example, {k: str(v) for k, v in summary.items()}
        )
        md5 = report.trained.model_md5
        mlflow.set_tags({MODEL_MD5_TAG: md5, KERAS_MODEL_ID_TAG: info.model_id})
        # The servable pyfunc model is logged by register, which knows evaluation's
        # threshold; run.json says where this one is.
        TrainingRun(
            model_md5=md5,
            run_id=self.run_id,
            experiment_id=mlflow.active_run().info.experiment_id,
            tracking_uri=self.uri,
            keras_model_uri=info.model_uri,
            model_id=info.model_id,
        ).write(self.paths.run)
        mlflow.set_tag("stage.train", "done")

    def _fail(self, err: BaseException) -> None:
        import mlflow

        with contextlib.suppress(*_tracking_failures()):
            mlflow.end_run("FAILED")  # pops the active run even when the server is down
        kept = (
            f"the trained model is kept in {self.paths.model}"
            if self.saved
            else f"completed epochs are kept in {self.backup}"
        )
        raise TrackingError(
            f"MLflow tracking server at {self.uri} failed during the train stage: "
            f"{redact(str(err))[:300]}. {kept}; run the stage again when the server answers "
            "(it resumes from the backup without repeating completed epochs)."
        ) from None

    def __exit__(self, exc_type, exc, tb) -> None:
        import mlflow

        if exc is not None and isinstance(exc, _tracking_failures()):
            self._fail(exc)
        mlflow.end_run()


# --- datasets ----------------------------------------------------------------------------------


def _source(paths: Paths) -> dict[str, Any]:
    f = paths.source_file
    return json.loads(f.read_text()) if f.is_file() else {}


def dataset(paths: Paths, split: str):
    """The prepared split as an MLflow dataset: digest = the DVC hash of data/prepared (from
    dvc.lock), source = where the data came from (Kaggle slug, S3 URI, folder, generator)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    rec = _source(paths)
    checksum = str(rec.get("checksum", "unknown"))
    where, url = location(rec)
    if url:
        source = HTTPDatasetSource(f"{redact(url)}#{checksum}")
    else:  # generated by code (the bundled sample)
        source = CodeDatasetSource({"generator": where, "checksum": checksum})
    digest = dvc_out_hash("augment", str(paths.prepared)) or checksum.removeprefix("sha256:")
    return MetaDataset(source, name=f"{split}", digest=digest[:32])


def log_dataset(paths: Paths, split: str) -> None:
    import mlflow

    context = {"train": "training", "val": "validation", "test": "test"}[split]
    mlflow.log_input(dataset(paths, split), context=context)


# --- the Keras model -----------------------------------------------------------------------------


class _KerasFolderFirst:
    """`mlflow.keras` as a flavor for `Model.log`, creating the model folder first.

    MLflow 3.17's `mlflow.keras.save_model` writes the input example before it creates the
    model folder, so `mlflow.keras.log_model(..., input_example=...)` fails with
    FileNotFoundError. This is the same flavor with that folder made before.
    """

    @staticmethod
    def save_model(path: str, **kwargs: Any) -> Any:
        import mlflow.keras

        os.makedirs(path, exist_ok=True)
        return mlflow.keras.save_model(path=path, **kwargs)


def log_keras_model(model: Any, example: Any, params: dict[str, str] | None = None):
    """Log the Keras model to the active run as a LoggedModel (MLflow 3's model API), with
    a signature and a real input example (one test image, RGB 0..255).

    Returns:
        The ModelInfo (`model_id`, `model_uri` = `models:/<model_id>`).
    """
    import numpy as np
    from mlflow.models import Model, infer_signature

    example = np.asarray(example, dtype=np.float32)
    signature = infer_signature(example, np.asarray(model.predict(example, verbose=0)))
    return Model.log(
        artifact_path=None,
        name=KERAS_MODEL,
        flavor=_KerasFolderFirst,
        flavor_name="mlflow.keras",
        model=model,
        signature=signature,
        input_example=example,
        pip_requirements=runtime_requirements(),
        params=params,
        model_type="keras-classifier",
    )


def runtime_requirements() -> list[str]:
    """Pinned requirements for serving the logged model (instead of MLflow's slow inference)."""
    import keras

    backend = keras.config.backend()
    return pinned("keras", "numpy", "tensorflow" if backend == "tensorflow" else backend)


def pinned(*pkgs: str) -> list[str]:
    """`pkg==version` of each installed package (those not installed are left out)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for p in pkgs:
        try:
            out.append(f"{p}=={version(p)}")
        except PackageNotFoundError:
            continue
    return out


# --- evaluation ----------------------------------------------------------------------------------

TEST_KEYS = ("accuracy", "precision", "recall", "f1", "roc_auc", "average_precision", "ece")


def evaluation_metrics(evaluation: Evaluation) -> dict[str, float]:
    """eval.json's numbers under their MLflow keys (`test/...`, `val/...`, `slice/...`)."""
    e = evaluation
    out = {f"test/{k}": rounded(getattr(e, k)) for k in TEST_KEYS if getattr(e, k) is not None}
    for k in ("accuracy", "f1", "roc_auc"):  # the 95% bootstrap interval's ends
        if ci := getattr(e, f"{k}_ci"):
            out[f"test/{k}_low"], out[f"test/{k}_high"] = map(rounded, ci)
    out["val/accuracy_at_threshold"] = rounded(e.val_accuracy_at_threshold)
    slices = e.slices or {}
    for attr, entry in slices.get("by_attribute", {}).items():
        for k in ("with", "without"):
            if entry[k]["accuracy"] is not None:
                out[f"slice/{slice_name(attr, k == 'with')}"] = rounded(entry[k]["accuracy"])
    if slices.get("worst_slice_gap") is not None:
        out["slice/worst_gap"] = rounded(slices["worst_slice_gap"])
    return out


def training_run(model: TrainedModel, record: Path) -> TrainingRun:
    """The MLflow run that holds `model` (configure() first).

    `record` (models/run.json, outside DVC's outputs) when it names this model: the
    workspace that trained it. Otherwise the newest run of the experiment tagged with the
    model's MD5: another machine (a fresh clone after `dvc pull`, CI, the GPU worker's
    parent), or an older model `dvc checkout` brought back. DVC hashes neither, so an
    identical re-training leaves the pipeline up to date; and a record of another model
    is never used, because it is keyed by the model's content hash.

    Raises:
        TrackingError: no run of the tracking store holds this model.
    """
    import mlflow

    try:
        run = TrainingRun.read(record) if record.is_file() else None
    except ContractError:
        run = None  # a record of an older genderclf: the tags say the same
    if run is not None and run.model_md5 == model.model_md5:
        return run
    found = mlflow.search_runs(
        experiment_names=[EXPERIMENT],
        filter_string=f"tags.`{MODEL_MD5_TAG}` = '{model.model_md5}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    if not found:
        raise TrackingError(
            f"no MLflow run in {redact(tracking_uri())} holds the trained model (md5 "
            f"{model.model_md5}): point MLFLOW_TRACKING_URI at the store it was logged to, "
            "or train it again here (`dvc repro --force train`)"
        )
    r = found[0]
    model_id = r.data.tags[KERAS_MODEL_ID_TAG]
    return TrainingRun(
        model_md5=model.model_md5,
        run_id=r.info.run_id,
        experiment_id=r.info.experiment_id,
        tracking_uri=redact(tracking_uri()),
        keras_model_uri=f"models:/{model_id}",
        model_id=model_id,
    )


def log_evaluation(
    paths: Paths, model: TrainedModel, evaluation: Evaluation, plots: list[Path]
) -> bool:
    """Log the evaluate stage's metrics and plots into the run that trained `model`
    (`training_run`); the metrics are linked to its Keras model and to the test dataset.

    Returns:
        False when no run holds the model (it was not trained by the train stage, or in
        another tracking store): the metrics stay in metrics/eval.json only.
    """
    import mlflow

    configure()
    try:
        run = training_run(model, paths.run)
    except TrackingError as err:
        log.warning("metrics not logged to MLflow: %s", err)
        return False
    with mlflow.start_run(run_id=run.run_id):
        mlflow.log_metrics(
            evaluation_metrics(evaluation),
            model_id=run.model_id,
            dataset=dataset(paths, "test"),
        )
        mlflow.set_tag("threshold", f"{evaluation.threshold_raw:.6f}")
        mlflow.log_artifact(str(paths.eval_metrics), "metrics")
        for f in plots:
            mlflow.log_artifact(str(f), "plots")
        mlflow.set_tag("stage.evaluate", "done")
    return True


# --- the run of a Prefect flow run ------------------------------------------------------------


def start_flow_run(
    flow_run_id: str, flow_run_name: str, flow_run_url: str | None
) -> tuple[str, str]:
    """Create the MLflow run every stage of a flow run logs into. Returns (run id, UI url).

    It carries the flow run's id, name and (when a Prefect UI is known) its URL, plus the
    source and user tags MLflow fills for runs it starts itself.
    """
    from mlflow import MlflowClient
    from mlflow.tracking.context.registry import resolve_tags

    from genderclf.tracking.setup import ui_link

    configure()
    client = MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT)
    tags = {
        **resolve_tags(),
        "prefect.flow_run_id": flow_run_id,
        "prefect.flow_run_name": flow_run_name,
    }
    if flow_run_url:
        tags["prefect.flow_run_url"] = flow_run_url
    run = client.create_run(exp.experiment_id, run_name=flow_run_name, tags=tags)
    url = ui_link(f"experiments/{exp.experiment_id}/runs/{run.info.run_id}")
    return run.info.run_id, url


def finish_flow_run(run_id: str) -> None:
    """End the flow run's MLflow run if no stage ended it."""
    from mlflow import MlflowClient

    client = MlflowClient()
    with contextlib.suppress(Exception):
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id)
