"""MLflow's side of `genderclf drift`: the champion with its reference, and the check's run.

The reference statistics are an artifact of the run the champion version comes from (the
register stage logs them and names them on the version, tag `genderclf.reference`), so
a drift check needs the registry and nothing of the training data.

Each check is logged as its own run in the `gender-classification-monitoring` experiment
(apart from the training runs), tagged with the champion's version, run and LoggedModel,
its metrics linked to that LoggedModel (`model_id`), and the report folder as artifacts.
A run rather than tags on the model version: checks repeat over time, each with numbers
and a plot, which is what runs hold (and compare in the UI); a version's tags hold one
value each. The newest verdict is also put on the version (`drift.last`), so the registry
page shows it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genderclf.tracking.registry import REFERENCE_TAG, current_alias
from genderclf.tracking.setup import (
    CHAMPION,
    EXPERIMENT,
    MODEL_NAME,
    MONITOR_DESCRIPTION,
    MONITOR_EXPERIMENT,
    TrackingError,
    call_with_retries,
    configure,
    ensure_experiment,
    require_store,
)

DRIFT_LAST = "drift.last"  # the newest verdict, on the champion's version


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

    require_store(f"{MODEL_NAME}@{CHAMPION} to compare against")
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
    experiment_id = ensure_experiment(MONITOR_EXPERIMENT, MONITOR_DESCRIPTION)
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=f"drift-{result['at']}", tags=tags
    ) as run:
        mlflow.log_metrics(metrics, model_id=champ.model_id if champ else None)
        for f in files:
            mlflow.log_artifact(str(f), "drift")
    if champ is not None:
        last = _last_tag(run.info.run_id, result["at"], result["drifted"], tags["drift.location"])
        MlflowClient().set_model_version_tag(MODEL_NAME, champ.version, DRIFT_LAST, last)
    return run.info.run_id


def _last_tag(run_id: str, at: str, drifted: bool, location: str) -> str:
    return json.dumps({"run_id": run_id, "at": at, "drifted": drifted, "location": location})[:5000]


def undo_drift_checks(location: str) -> dict[str, Any]:
    """Remove the drift checks of `location` and of everything under it, and put the
    champion's `drift.last` back on the newest check that is left (or remove it).

    For a watch that fed itself (docs/monitoring.md): its checks are runs tagged
    `genderclf.kind=drift` whose `drift.location` starts with the folder it watched, in
    the monitoring experiment or (before it existed) `gender-classification`. The runs are
    deleted the MLflow way (`mlflow gc` purges them and their artifacts).

    Returns:
        {"deleted": run ids, "drift_last": the champion's tag now (None: removed)}.

    Raises:
        TrackingError: no store, or the store did not answer.
    """
    from mlflow import MlflowClient

    require_store("drift checks to remove")
    configure()
    client = MlflowClient()
    exps = [e for n in (MONITOR_EXPERIMENT, EXPERIMENT) if (e := client.get_experiment_by_name(n))]
    ids = [e.experiment_id for e in exps]
    checks = client.search_runs(ids, "tags.`genderclf.kind` = 'drift'", max_results=50000)
    prefix = location.rstrip("/")
    gone = [
        r
        for r in checks
        if (where := r.data.tags.get("drift.location", "")) == prefix
        or where.startswith(prefix + "/")
    ]
    for r in gone:
        client.delete_run(r.info.run_id)
    champ = current_alias(client, CHAMPION)
    tag = None
    if champ is not None:
        deleted = {r.info.run_id for r in gone}
        kept = sorted(
            (
                r
                for r in checks
                if r.info.run_id not in deleted
                and r.data.tags.get("champion.version") == str(champ.version)
            ),
            key=lambda r: r.info.start_time,
        )
        if kept:
            r = kept[-1]
            tag = _last_tag(
                r.info.run_id,
                r.info.run_name.removeprefix("drift-"),
                r.data.tags.get("drift.detected") == "true",
                r.data.tags.get("drift.location", ""),
            )
            client.set_model_version_tag(MODEL_NAME, str(champ.version), DRIFT_LAST, tag)
        elif DRIFT_LAST in champ.tags:
            client.delete_model_version_tag(MODEL_NAME, str(champ.version), DRIFT_LAST)
    return {"deleted": [r.info.run_id for r in gone], "drift_last": tag}
