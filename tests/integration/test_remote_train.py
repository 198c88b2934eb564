"""Training on a worker: a real Prefect server, a process work pool named `gpu`, a worker
in a second clone of the repository, and a shared DVC remote (a local folder).

The parent flow runs the data stages here, pushes the prepared data, calls the `train/gpu`
deployment, and finishes evaluate and register with the worker's model; the workspace ends
consistent with its dvc.lock.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tests.helpers import BIN
from tests.helpers.servers import free_port, wait_http
from tests.helpers.workspace import copy_pipeline, nothing_stale

from genderclf import config as C

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STAGES = ["download", "validate", "split", "augment", "tune", "train", "evaluate", "register"]


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture
def setup(tmp_path, tiny_params, monkeypatch):
    parent, clone = tmp_path / "parent", tmp_path / "worker-clone"
    copy_pipeline(parent, ("src", "flows"))
    params = yaml.safe_load(yaml.safe_dump(tiny_params))
    params["train"].update(backbone="simple_cnn", epochs_head=1, epochs_finetune=1)
    (parent / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    home = tmp_path / "prefect-home"
    env = {
        **os.environ,
        "GIT_CONFIG_GLOBAL": os.devnull,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DVC_NO_ANALYTICS": "1",
    }
    env.pop("PREFECT_API_URL", None)
    git_id = ["-c", "user.name=t", "-c", "user.email=t@example.com"]
    _run(["git", "init", "-q"], parent, env)
    _run(["git", "add", "-A"], parent, env)
    _run(["git", *git_id, "commit", "-qm", "init"], parent, env)
    _run(["git", "clone", "-q", str(parent), str(clone)], tmp_path, env)
    remote = tmp_path / "dvc-remote"
    for repo in (parent, clone):  # the shared DVC remote, outside both clones
        _run(
            [str(BIN / "dvc"), "remote", "modify", "--local", "local", "url", str(remote)],
            repo,
            env,
        )

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env["PREFECT_API_URL"] = api
    procs: list[subprocess.Popen] = []
    logs = tmp_path / "logs"
    logs.mkdir()
    try:
        procs.append(
            subprocess.Popen(
                [
                    str(BIN / "prefect"),
                    "server",
                    "start",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
                cwd=tmp_path,
                env=env,
                stdout=open(logs / "server.log", "w"),  # noqa: SIM115 (kept open)
                stderr=subprocess.STDOUT,
            )
        )
        wait_http(f"{api}/health", 120)
        _run(
            [str(BIN / "prefect"), "work-pool", "create", "gpu", "--type", "process"], tmp_path, env
        )
        worker_env = {**env, "PYTHONPATH": f"{clone}{os.pathsep}{clone / 'src'}"}
        _run(
            [
                sys.executable,
                "-c",
                "from prefect import flow; "
                "flow.from_source(source='.', entrypoint='flows/train.py:train_flow')"
                ".deploy(name='gpu', work_pool_name='gpu')",
            ],
            clone,
            worker_env,
        )
        procs.append(
            subprocess.Popen(
                [str(BIN / "prefect"), "worker", "start", "--pool", "gpu"],
                cwd=clone,
                env=worker_env,
                stdout=open(logs / "worker.log", "w"),  # noqa: SIM115 (kept open)
                stderr=subprocess.STDOUT,
            )
        )
        for k in (
            "PATH",
            "MLFLOW_TRACKING_URI",
            "PREFECT_HOME",
            "PREFECT_API_URL",
            "DVC_NO_ANALYTICS",
            "GIT_CONFIG_GLOBAL",
            "PREFECT_SERVER_ANALYTICS_ENABLED",
        ):
            monkeypatch.setenv(k, env[k])
        monkeypatch.setenv("PYTHONPATH", str(parent / "src"))
        yield parent, clone, env, logs
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_parent_trains_on_the_gpu_pool_worker_through_the_dvc_remote(setup):
    from flows.pipeline import gender_pipeline
    from mlflow import MlflowClient

    parent, clone, env, logs = setup
    result = gender_pipeline(repo=str(parent), train_on="train/gpu")
    assert result["train"] == "ran (remote)"
    assert [result[s] for s in STAGES if s != "train"] == ["ran"] * 7

    # the worker trained, in its own clone, and pushed the model to the shared remote
    assert (clone / C.PATHS.model).is_file()
    worker_log = (logs / "worker.log").read_text()
    assert "Finished in state Completed" in worker_log, worker_log[-3000:]

    # the parent's workspace: every stage locked and up to date, the model pulled from the remote
    lock = yaml.safe_load((parent / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    status = _run([str(BIN / "dvc"), "status"], parent, env)
    assert nothing_stale(status), status
    assert (parent / C.PATHS.model).read_bytes() == (clone / C.PATHS.model).read_bytes()
    clone_lock = yaml.safe_load((clone / "dvc.lock").read_text())
    assert lock["stages"]["train"] == clone_lock["stages"]["train"]

    # one MLflow run for the flow run: the worker's training and the parent's evaluation
    run = MlflowClient().get_run(result["mlflow_run_id"])
    assert run.data.params["train.backbone"] == "simple_cnn"
    assert "test/accuracy" in run.data.metrics
    assert json.loads((parent / C.PATHS.run).read_text())["run_id"] == result["mlflow_run_id"]
    assert (parent / C.PATHS.register_report).is_file()
