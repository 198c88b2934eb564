"""MLflow runs: the training run (params, lineage, per-epoch metrics, the model), the
evaluation logged into it, and the run that a Prefect flow run opens for its stages.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from genderclf.config import Paths, Settings
from genderclf.io import write_json
from genderclf.tracking.setup import EXPERIMENT, TrackingError, configure, lineage_tags, redact

log = logging.getLogger(__name__)


def _tracking_failures():
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    return (MlflowException, RequestException)


class TrainingRun:
    """The MLflow run of one training, as a context manager around the train stage.

    Entering checks the tracking server (before any epoch is spent), starts the run or
    resumes the one a killed training left in its backup folder (or adopts MLFLOW_RUN_ID,
    the run of a Prefect flow run), and logs the params and lineage tags. A tracking
    failure inside the block is reported as one TrackingError that says what was kept.
    """

    def __init__(self, settings: Settings, paths: Paths, backup: Path):
        self.settings, self.paths, self.backup = settings, paths, backup
        self.uri = ""
        self.run_id = ""
        self.saved = False

    def __enter__(self) -> TrainingRun:
        import mlflow

        self.uri = configure()
        run_file = self.backup / "mlflow_run_id"
        resumed = run_file.read_text().strip() if run_file.exists() else None
        try:
            run = mlflow.start_run(run_id=resumed or os.environ.get("MLFLOW_RUN_ID"))
            self.run_id = run.info.run_id
            self.backup.mkdir(parents=True, exist_ok=True)
            run_file.write_text(self.run_id)
            if resumed is None:
                mlflow.log_params({k: str(v)[:500] for k, v in self.settings.flat().items()})
            mlflow.set_tags(lineage_tags(self.paths.params, self.paths.source_file,
                                         str(self.paths.prepared)))  # fmt: skip
            mlflow.set_tag("stage.train", "running")
        except _tracking_failures() as err:
            self._fail(err)
        return self

    def log_epoch(self, row: dict[str, Any]) -> None:
        """One epoch's history row as metrics at step `epoch`; never fails the training."""
        import mlflow

        try:
            mlflow.log_metrics({k: v for k, v in row.items()
                                if k not in ("epoch", "phase", "seconds") and v is not None},
                               step=int(row["epoch"]))  # fmt: skip
        except Exception as err:  # a tracking hiccup must not kill hours of training
            log.warning("could not log epoch %d to MLflow (%s); it stays in %s",
                        row["epoch"], type(err).__name__, self.paths.history)  # fmt: skip

    def log_training(self, report: Any) -> None:
        """The train stage's report: best metrics, the curves, the Keras model, run.json."""
        import mlflow

        self.saved = True
        m = report.metrics
        mlflow.log_metrics({f"best_{k}": v for k, v in m.items()
                            if isinstance(v, int | float) and v is not None})  # fmt: skip
        mlflow.log_artifact(str(self.paths.curves), "plots")
        mlflow.log_artifact(str(self.paths.history), "plots")
        keras_uri = log_keras_model(report.model, report.image_size)
        # The servable pyfunc model is logged by register, which knows evaluation's
        # threshold; run.json carries what it needs to package this one.
        exp_id = mlflow.active_run().info.experiment_id
        write_json(self.paths.run, {"run_id": self.run_id, "experiment_id": exp_id,
                                    "tracking_uri": self.uri, "keras_model_uri": keras_uri,
                                    "image_size": report.image_size, "resize": report.resize})  # fmt: skip
        mlflow.set_tag("stage.train", "done")

    def _fail(self, err: BaseException) -> None:
        import mlflow

        with contextlib.suppress(*_tracking_failures()):
            mlflow.end_run("FAILED")  # pops the active run even when the server is down
        kept = (f"the trained model is kept in {self.paths.model}" if self.saved
                else f"completed epochs are kept in {self.backup}")  # fmt: skip
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


def log_keras_model(model: Any, image_size: int) -> str:
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
    import keras

    backend = keras.config.backend()
    return _pinned("keras", "numpy", "tensorflow" if backend == "tensorflow" else backend)


def _pinned(*pkgs: str) -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for p in pkgs:
        try:
            out.append(f"{p}=={version(p)}")
        except PackageNotFoundError:
            continue
    return out


def log_evaluation(paths: Paths, metrics: dict[str, Any], plots: list[Path]) -> bool:
    """Log the evaluate stage's metrics and plots into the training run (from run.json).

    Returns:
        False when there is no run.json (the model was not trained by the train stage).
    """
    import mlflow

    if not paths.run.is_file():
        log.warning("%s missing: metrics not logged to MLflow", paths.run)
        return False
    configure()
    run_id = json.loads(paths.run.read_text())["run_id"]
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"test_{k}": float(v) for k, v in metrics.items()
                            if isinstance(v, int | float) and v is not None})  # fmt: skip
        slices = metrics.get("slices")
        if slices:
            for a, e in slices["by_attribute"].items():
                for k in ("with", "without"):
                    if e[k]["accuracy"] is not None:
                        mlflow.log_metric(f"slice_{a}_{k}_accuracy", e[k]["accuracy"])
        mlflow.log_artifact(str(paths.eval_metrics), "metrics")
        for f in plots:
            mlflow.log_artifact(str(f), "plots")
        mlflow.set_tag("stage.evaluate", "done")
    return True


# --- the run of a Prefect flow run ------------------------------------------------------------


def start_flow_run(flow_run_id: str, flow_run_name: str) -> tuple[str, str]:
    """Create the MLflow run every stage of a flow run logs into. Returns (run id, UI url)."""
    from mlflow import MlflowClient

    from genderclf.tracking.setup import tracking_uri

    configure()
    client = MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT)
    run = client.create_run(exp.experiment_id, run_name=flow_run_name,
                            tags={"prefect.flow_run_id": flow_run_id,
                                  "prefect.flow_run_name": flow_run_name})  # fmt: skip
    uri = tracking_uri()
    base = (
        uri if uri.startswith("http") else os.environ.get("MLFLOW_UI_URL", "http://127.0.0.1:5000")
    )
    url = f"{redact(base).rstrip('/')}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"
    return run.info.run_id, url


def finish_flow_run(run_id: str) -> None:
    """End the flow run's MLflow run if no stage ended it."""
    from mlflow import MlflowClient

    client = MlflowClient()
    with contextlib.suppress(Exception):
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id)
