"""The worker entry point of the CPU image joins a Prefect server on loopback and runs a
deployment of the pipeline flow (`flows/pipeline.py:gender_pipeline`) to completion.

Both the server (`prefect-server`, SQLite) and the worker (`worker --pool cpu`) run from the
image, on the host's network. The worker clones the pipeline from GENDERCLF_GIT_URL (a
read-only mount) into an empty /workspace mounted from the host, deploys prefect.yaml's
`on-demand` deployment from there, and runs it as a process of its container.
"""

from __future__ import annotations

import json
import uuid

import pytest
import yaml
from tests.docker.engine import free_port, wait_http
from tests.docker.pipeline_repo import IMAGE_UID, STAGES, owned_by_image_user
from tests.docker.prefect_runs import (
    flow_run_logs,
    run_deployment,
    task_runs,
    wait_for_flow_run,
    wait_for_worker,
)

from genderclf import config as C
from genderclf.tracking.setup import CHAMPION, MODEL_NAME

pytestmark = pytest.mark.docker


def test_worker_joins_a_server_and_runs_the_pipeline_deployment(
    engine, cpu_image, pipeline_source, tmp_path
):
    name = f"genderclf-test-{uuid.uuid4().hex[:8]}"
    server, worker = f"{name}-prefect", f"{name}-worker"
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    owned_by_image_user(workspace)

    def exited(container: str) -> str | None:
        state = engine.inspect(container)["State"]
        if not state["Running"]:
            return f"{container} exited {state['ExitCode']}:\n{engine.logs(container)}"
        return None

    try:
        engine(
            "run",
            "--detach",
            "--name",
            server,
            "--network",
            "host",
            "--env",
            "PREFECT_SERVER_API_HOST=127.0.0.1",
            cpu_image,
            "prefect-server",
            "--port",
            str(port),
        )
        wait_http(f"{api}/health", 300, alive=lambda: exited(server))
        engine(
            "run",
            "--detach",
            "--name",
            worker,
            "--network",
            "host",
            "--env",
            f"PREFECT_API_URL={api}",
            "--env",
            "GENDERCLF_GIT_URL=/source",
            "--volume",
            f"{pipeline_source}:/source:ro",
            "--volume",
            f"{workspace}:/workspace",
            cpu_image,
            "worker",
            "--pool",
            "cpu",
            "--type",
            "process",
        )
        joined = wait_for_worker(api, "cpu", 300, alive=lambda: exited(worker))
        assert joined["name"].startswith("ProcessWorker")

        deployed = engine(
            "exec",
            "--workdir",
            "/workspace",
            worker,
            "prefect",
            "--no-prompt",
            "deploy",
            "--name",
            "on-demand",
        )
        assert "gender-pipeline/on-demand" in deployed.stdout, deployed.stdout[-2000:]
        run_id = run_deployment(api, "gender-pipeline/on-demand")
        run = wait_for_flow_run(api, run_id, 1500, alive=lambda: exited(worker))
        assert run["state_type"] == "COMPLETED", (
            f"{run['state_type']}: {run['state']['message']}\n{flow_run_logs(api, run_id)}"
        )
        assert run["work_pool_name"] == "cpu"
        tasks = task_runs(api, run_id)
        assert {s: tasks.get(s) for s in STAGES} == dict.fromkeys(STAGES, "COMPLETED"), tasks
    finally:
        engine.remove(worker, server)

    # The flow ran in the worker's clone, on the mounted /workspace: the clone of the
    # source at its commit, every stage recorded, a champion in its MLflow store.
    assert (workspace / ".git").is_dir()
    assert (workspace / "params.yaml").read_text() == (pipeline_source / "params.yaml").read_text()
    lock = yaml.safe_load((workspace / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    assert (workspace / "dvc.lock").stat().st_uid == IMAGE_UID
    report = json.loads((workspace / C.PATHS.register_report).read_text())
    assert report["decision"] == "promoted"
    from mlflow import MlflowClient

    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    champion = client.get_model_version_by_alias(MODEL_NAME, CHAMPION)
    assert str(champion.version) == report["version"]
    # the flow's MLflow run is the one the stages logged into, tagged with this flow run
    run_tags = client.get_run(champion.run_id).data.tags
    assert run_tags["prefect.flow_run_id"] == run_id
