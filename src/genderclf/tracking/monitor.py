"""MLflow's side of `genderclf drift`: the champion with its reference, and the check's run.

The reference statistics are an artifact of the run the champion version comes from (the
register stage logs them and names them on the version, tag `genderclf.reference`), so
a drift check needs the registry and nothing of the training data.

Each check is logged as its own run in the `gender-classification` experiment, tagged
with the champion's version, run and LoggedModel, its metrics linked to that LoggedModel
(`model_id`), and the report folder as artifacts. A run rather than tags on the model
version: checks repeat over time, each with numbers and a plot, which is what runs hold
(and compare in the UI); a version's tags hold one value each. The newest verdict is
also put on the version (`drift.last`), so the registry page shows it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genderclf.tracking.registry import REFERENCE_TAG, current_alias
from genderclf.tracking.setup import (
    CHAMPION,
    MODEL_NAME,
    TrackingError,
    call_with_retries,
    configure,
)


@dataclass(frozen=True)
class Champion:
    version: str
    run_id: str
    model_id: str | None
    model_uri: str  # models:/gender-classifier/<version>: pinned, the alias may move
    reference_uri: str | None

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "run_id": self.run_id,
            "model_id": self.model_id,
            "model_uri": self.model_uri,
            "reference_uri": self.reference_uri,
        }


def champion(retries: int = 3) -> Champion:
    """The version `champion` points at now.

    Raises:
        TrackingError: no champion yet.
    """
    from mlflow import MlflowClient

    where = f"MLflow model registry at {configure(retries)}"
    client = MlflowClient()
    mv = call_with_retries(lambda: current_alias(client, CHAMPION), retries, 1.0, where)
    if mv is None:
        raise TrackingError(
            f"{where} has no {MODEL_NAME}@{CHAMPION}: run the pipeline first "
            "(e.g. `make demo`); a drift check compares against the champion"
        )
    return Champion(
        str(mv.version),
        mv.run_id,
        getattr(mv, "model_id", None),
        f"models:/{MODEL_NAME}/{mv.version}",
        mv.tags.get(REFERENCE_TAG),
    )


def download_reference(champ: Champion, dst: Path, retries: int = 3) -> Path:
    """The champion's reference statistics, downloaded into `dst`.

    Raises:
        TrackingError: the version has none (registered before drift monitoring) or the
            download failed.
    """
    import mlflow

    if not champ.reference_uri:
        raise TrackingError(
            f"{MODEL_NAME} version {champ.version} has no reference statistics "
            f"(tag {REFERENCE_TAG}; registered before drift monitoring): run "
            "`dvc repro evaluate register` to register a model with them, or "
            "pass --reference reports/reference.npz"
        )
    return Path(
        call_with_retries(
            lambda: mlflow.artifacts.download_artifacts(
                artifact_uri=champ.reference_uri, dst_path=str(dst)
            ),
            retries,
            1.0,
            f"MLflow artifact store ({champ.reference_uri})",
        )
    )


def log_drift(result: dict[str, Any], files: list[Path], champ: Champion | None) -> str:
    """The check as a run (tags, metrics linked to the champion's LoggedModel, the report
    folder as artifacts); the verdict on the champion version. Returns the run id."""
    import mlflow
    from mlflow import MlflowClient

    configure()
    v = result["views"]
    metrics = {
        "drift/detected": float(result["drifted"]),
        "drift/batch_images": float(result["batch"]["images"]),
        "drift/unreadable": float(len(result["batch"]["failed"])),
        "drift/mmd2": v["embeddings"]["mmd2"],
        "drift/mmd_p": v["embeddings"]["p_value"],
        "drift/male_fraction": v["predictions"]["batch_male_fraction"],
        "drift/male_fraction_delta": v["predictions"]["male_fraction_delta"],
        "drift/mean_confidence": v["predictions"]["batch_mean_confidence"],
    }
    for f in v["image"]["features"]:
        metrics[f"drift/ks_{f['name']}"] = f["statistic"]
    tags = {
        "genderclf.kind": "drift",
        "drift.location": result["batch"]["location"][:5000],
        "drift.detected": str(result["drifted"]).lower(),
    }
    if champ is not None:
        tags.update(
            {
                "champion.version": champ.version,
                "champion.run_id": champ.run_id,
                "champion.model_id": champ.model_id or "",
            }
        )
    with mlflow.start_run(run_name=f"drift-{result['at']}", tags=tags) as run:
        mlflow.log_metrics(metrics, model_id=champ.model_id if champ else None)
        for f in files:
            mlflow.log_artifact(str(f), "drift")
    if champ is not None:
        last = json.dumps(
            {
                "run_id": run.info.run_id,
                "at": result["at"],
                "drifted": result["drifted"],
                "location": result["batch"]["location"],
            }
        )
        MlflowClient().set_model_version_tag(MODEL_NAME, champ.version, "drift.last", last[:5000])
    return run.info.run_id
