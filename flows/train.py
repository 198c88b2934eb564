"""The `train` flow: only the training stage, deployable to the `gpu` work pool.

The parent flow (`gender-pipeline` with `train_on="train/gpu"`) and the worker exchange
data through the DVC remote, never through a shared disk:

1. the parent pushes the prepared data (`dvc push augment`) and calls this flow with
   `run_deployment`, passing its params.yaml and the lock entries of the upstream stages;
2. the worker (in its own clone) writes those, pulls the prepared data, runs
   `dvc repro --single-item train`, pushes the model, and returns the train lock entry
   plus the small uncached outputs (run id, metrics, history);
3. the parent writes them back, pulls the model and continues with evaluate and register,
   ending with the same dvc.lock as a local run.

The training logs into the parent flow run's MLflow run: its id travels as a parameter and
reaches the worker's train stage through MLflow's own `MLFLOW_RUN_ID`. The worker also
sends back `models/run.json` (outside DVC's outputs: which MLflow run holds the model).
"""

from __future__ import annotations

import base64
import os
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "src"):  # run as a script from a checkout without installing
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from flows import dvc_ops as dvc  # noqa: E402
from genderclf.config import PATHS  # noqa: E402
from genderclf.tracking.runs import RUN_ID_VARIABLE  # noqa: E402

TRAIN_STAGE = "train"


@flow(name="train", log_prints=True, persist_result=True)
def train_flow(
    params_yaml: str,
    upstream_lock: dict[str, Any],
    repo: str | None = None,
    mlflow_run_id: str | None = None,
) -> dict[str, Any]:
    """Train on this worker with the parent's params and data (see module docstring).

    Returns:
        {"lock": the train stage's dvc.lock entry, "files": {path: base64 content}}
    """
    logger = get_run_logger()
    root = Path(repo).resolve() if repo else REPO
    (root / "params.yaml").write_text(params_yaml)
    lock = dvc.read_lock(root)
    lock.setdefault("stages", {}).update(upstream_lock)
    dvc.write_lock(root, lock)
    logger.info("pulling prepared data from the DVC remote")
    dvc.run(root, "pull", "augment")
    if mlflow_run_id:  # log into the parent flow run's MLflow run
        os.environ[RUN_ID_VARIABLE] = mlflow_run_id
    out = dvc.run(root, "repro", "--single-item", TRAIN_STAGE)
    logger.info(out[-3000:])
    dvc.run(root, "push", TRAIN_STAGE)
    entry = dvc.read_lock(root)["stages"][TRAIN_STAGE]
    files = {
        p: base64.b64encode((root / p).read_bytes()).decode()
        for p in [*dvc.uncached_outs(root, TRAIN_STAGE), PATHS.run.as_posix()]
        if (root / p).is_file()
    }
    return {"lock": entry, "files": files}


def train_remotely(
    root: Path, deployment: str, mlflow_run_id: str | None = None, timeout_s: float | None = None
) -> str:
    """Parent side: push data, run the `train` deployment, adopt its outputs. Returns "ran".

    `mlflow_run_id`: the parent flow run's MLflow run, which the training logs into."""
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    lock = dvc.read_lock(root)["stages"]
    upstream = {k: v for k, v in lock.items() if k in ("download", "validate", "split", "augment")}
    dvc.run(root, "push", "augment")
    logger.info("prepared data pushed; running deployment %s", deployment)
    params = {
        "params_yaml": (root / "params.yaml").read_text(),
        "upstream_lock": upstream,
        "mlflow_run_id": mlflow_run_id,
    }
    fr = run_deployment(deployment, parameters=params, timeout=timeout_s)
    if not fr.state or not fr.state.is_completed():
        raise RuntimeError(
            f"remote training {deployment} ended {fr.state.name if fr.state else 'without a state'}"
        )
    result = fr.state.result()
    full = dvc.read_lock(root)
    full.setdefault("stages", {})[TRAIN_STAGE] = result["lock"]
    dvc.write_lock(root, full)
    for path, b64 in result["files"].items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(base64.b64decode(b64))
    dvc.run(root, "pull", TRAIN_STAGE)
    logger.info("model pulled from the DVC remote; continuing locally")
    return "ran (remote)"


if __name__ == "__main__":
    # Serve this flow from a worker's clone: `python flows/train.py`
    # (docs/orchestration.md, "GPU worker").
    train_flow.serve(name="gpu-local")
