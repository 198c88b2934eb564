"""New images -> drift check -> retraining, through a real Prefect server's events.

A real server on loopback, the repository's prefect.yaml deployed (the `monitor/on-arrival`
and `gender-pipeline/on-demand` deployments with their triggers), a process worker, and a
champion with its reference in a real MLflow store. Images dropped into the watched
folder are noticed by the `watch` flow (a real flow run against the server), whose
`genderclf.data.arrived` event makes the server start `monitor`; a darkened batch makes
it emit `genderclf.drift.detected`, which makes the server start the pipeline, and that
run retrains in the workspace (a git + DVC checkout of the pipeline) and registers a new
version beside the champion. A batch like the reference starts the check and nothing
after it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.helpers import BIN, REPO_ROOT
from tests.helpers import params as P
from tests.helpers.servers import free_port, http_json, wait_http
from tests.helpers.stages import copy_images, register_champion
from tests.helpers.workspace import copy_pipeline, git_init, pipeline_env

from genderclf.data.split import read_split

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _prefect(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(
        [str(BIN / "prefect"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"prefect {args}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _runs(api: str, deployment: str) -> list[dict]:
    dep = http_json(f"{api}/deployments/name/{deployment}")
    return http_json(
        f"{api}/flow_runs/filter",
        {"flow_runs": {"deployment_id": {"any_": [dep["id"]]}}, "sort": "START_TIME_ASC"},
    )


def _wait_final(api: str, deployment: str, count: int, timeout: float, logs: list[Path]) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = _runs(api, deployment)
        if len(runs) >= count and all(
            r["state_type"] in ("COMPLETED", "FAILED", "CRASHED") for r in runs[:count]
        ):
            return runs
        time.sleep(2)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
    raise AssertionError(f"{deployment}: {len(runs)} runs, wanted {count} finished:\n{tails}")


def _retrained_version_is_registered(project: Path) -> None:
    import json

    from mlflow import MlflowClient

    from genderclf import config as C
    from genderclf.tracking.setup import CHALLENGER, CHAMPION, MODEL_NAME

    report = json.loads((project / C.PATHS.register_report).read_text())
    assert str(report["version"]) == "2" and report["decision"] in ("promoted", "rejected"), report
    client = MlflowClient()
    version = client.get_model_version(MODEL_NAME, "2")
    run = json.loads((project / C.PATHS.run).read_text())
    assert version.run_id == run["run_id"]  # trained by the triggered run, not the champion's
    alias = CHAMPION if report["decision"] == "promoted" else CHALLENGER
    assert alias in version.aliases, (alias, version.aliases)
    assert (project / "dvc.lock").is_file()  # `dvc repro` ran in the workspace


def test_new_batch_to_drift_check_to_retraining(
    mlflow_store, real_params, sample_data, prepared, tmp_path
):
    raw, splits = sample_data
    register_champion(P.shrink(real_params, P.DRIFT_CHAMPION), raw, splits, prepared)
    # The workspace: a checkout of the pipeline (git + DVC, the champion's params.yaml)
    # that also holds the champion's mlflow.db, mlruns/, models/ and reports/ (git-ignored).
    project = copy_pipeline(tmp_path, ("src", "flows"))
    shutil.copy2(REPO_ROOT / "prefect.yaml", project / "prefect.yaml")
    git_init(project)
    incoming = project / "incoming"
    incoming.mkdir()
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = pipeline_env(project, drop=("PREFECT_",))
    env.update(
        {
            "PREFECT_HOME": str(tmp_path / "prefect-home"),
            "PREFECT_API_URL": api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "GENDERCLF_REPO": str(project),
            "GENDERCLF_WATCH": str(incoming),
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"],
        }
    )
    logs = [tmp_path / "server.log", tmp_path / "worker.log"]
    procs: list[subprocess.Popen] = []
    try:
        with open(logs[0], "w") as out:
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
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
        wait_http(f"{api}/health", 180, procs[0], logs[0])
        _prefect(["work-pool", "create", "cpu", "--type", "process"], project, env)
        # The two triggered deployments only: the scheduled ones would start runs of their own.
        _prefect(["--no-prompt", "deploy", "-n", "on-arrival", "-n", "on-demand"], project, env)
        with open(logs[1], "w") as out:
            procs.append(
                subprocess.Popen(
                    [str(BIN / "prefect"), "worker", "start", "--pool", "cpu"],
                    cwd=project,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )

        def watch() -> None:
            proc = subprocess.run(
                [sys.executable, "flows/monitor.py", "--watch", str(incoming)],
                cwd=project,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

        watch()  # the baseline: an empty folder, no event
        train = read_split(splits, "train")["path"].tolist()[:80]
        copy_images(train, raw, incoming / "batch-1")  # like the reference
        watch()
        (check,) = _wait_final(api, "monitor/on-arrival", 1, 420, logs)
        assert check["state_type"] == "COMPLETED", check
        assert check["parameters"] == {"location": str(incoming / "batch-1")}
        time.sleep(10)  # an event from a drifted check would have started the pipeline by now
        assert _runs(api, "gender-pipeline/on-demand") == []
        query = {"filter": {"event": {"name": ["genderclf.drift.detected"]}}, "limit": 10}
        assert http_json(f"{api}/events/filter", query)["events"] == []
        arrived = {"filter": {"event": {"name": ["genderclf.data.arrived"]}}, "limit": 10}
        (first,) = http_json(f"{api}/events/filter", arrived)["events"]  # none for the baseline
        assert first["payload"]["new_files"] == 80

        copy_images(train, raw, incoming / "batch-2", darken=0.45)  # a darker camera
        watch()
        checks = _wait_final(api, "monitor/on-arrival", 2, 420, logs)
        assert checks[1]["state_type"] == "COMPLETED", checks[1]
        assert checks[1]["parameters"] == {"location": str(incoming / "batch-2")}
        deadline = time.monotonic() + 120
        while (
            not (pipeline := _runs(api, "gender-pipeline/on-demand"))
            and time.monotonic() < deadline
        ):
            time.sleep(2)
        assert len(pipeline) == 1, "genderclf.drift.detected did not start the pipeline"
        deadline = time.monotonic() + 60  # the server persists events in batches
        while not (events := http_json(f"{api}/events/filter", query)["events"]):
            assert time.monotonic() < deadline, "no genderclf.drift.detected event stored"
            time.sleep(2)
        assert len(events) == 1
        payload = events[0]["payload"]
        assert events[0]["resource"]["prefect.resource.id"] == (
            f"genderclf.dataset.{incoming / 'batch-2'}"
        )
        assert payload["champion_version"] == "1" and "image" in payload["views"]
        assert "brightness" in payload["features"] and payload["images"] == 80

        # The retraining it started: the whole DAG in the workspace, a new version registered.
        (retrain,) = _wait_final(api, "gender-pipeline/on-demand", 1, 1500, logs)
        assert retrain["state_type"] == "COMPLETED", retrain
        _retrained_version_is_registered(project)
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
