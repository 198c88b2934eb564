"""The watch deployment on a real Prefect server: it cannot feed itself.

Deployed from prefect.yaml as users do (`every-5-min` with GENDERCLF_WATCH, the monitor's
`on-arrival` with its trigger) and run by a process worker, three watch cycles started
with `prefect deployment run` over an unchanged folder emit no `genderclf.data.arrived`,
so the monitor never runs. A run without a location, or on the workspace itself (what
once listed `.venv` and the monitor's own plots every 5 minutes, a loop), fails at once
with one line. The server is started the way `make ui` starts it
(PREFECT_SERVER_API_PORT with --port), so its UI asks the right port.
(That prefect.yaml schedules no watch run when GENDERCLF_WATCH is unset:
test_schedule.py, which deploys everything.)
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from tests.helpers import BIN, REPO_ROOT
from tests.helpers.servers import free_port, http_json, wait_http
from tests.helpers.workspace import copy_pipeline, pipeline_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # ~2 minutes on 2 cores


def _prefect(args: list[str], cwd: Path, env: dict[str, str], check: bool = True):
    proc = subprocess.run(
        [str(BIN / "prefect"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=400
    )
    if check:
        assert proc.returncode == 0, (
            f"prefect {args}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def _run_watch(project: Path, env: dict[str, str], *params: str) -> tuple[dict, list[str]]:
    """`prefect deployment run watch/every-5-min --watch`: the finished run, its flow run's
    log lines."""
    args = ["deployment", "run", "watch/every-5-min", "--watch", "--watch-timeout", "300"]
    for p in params:
        args += ["--param", p]
    proc = _prefect(args, project, env, check=False)
    (run_id,) = re.findall(r"UUID: ([0-9a-f-]{36})", proc.stdout)
    api = env["PREFECT_API_URL"]
    run = http_json(f"{api}/flow_runs/{run_id}")
    logs = http_json(f"{api}/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}})
    return run, [entry["message"] for entry in logs]


def test_three_watch_cycles_over_an_unchanged_folder_emit_nothing(tmp_path, make_image):
    project = copy_pipeline(tmp_path / "project", ("src", "flows"))
    for name in ("params.yaml", "prefect.yaml"):
        shutil.copy2(REPO_ROOT / name, project / name)
    incoming = project / "incoming"
    for i in range(3):
        make_image(incoming / "batch-0" / f"{i}.jpg")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    base = pipeline_env(project, drop=("PREFECT_", "MLFLOW_", "GENDERCLF_"))
    base.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    env = {
        **base,
        "PREFECT_API_URL": api,
        "GENDERCLF_REPO": str(project),
        "GENDERCLF_WATCH": str(incoming),
        "PREFECT_WORKER_QUERY_SECONDS": "2",
    }
    logs = [tmp_path / "server.log", tmp_path / "worker.log"]
    procs: list[subprocess.Popen] = []
    try:
        with open(logs[0], "w") as out:  # as `make ui` starts it
            procs.append(
                subprocess.Popen(
                    [
                        BIN / "prefect",
                        "server",
                        "start",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                    ],
                    cwd=tmp_path,
                    env={**base, "PREFECT_SERVER_API_PORT": str(port)},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
        wait_http(f"{api}/health", 180, procs[0], logs[0])
        # The UI's API address: the server's own port, not Prefect's default 4200.
        assert http_json(f"http://127.0.0.1:{port}/ui-settings")["api_url"] == api
        _prefect(["work-pool", "create", "cpu", "--type", "process"], project, env)
        _prefect(["--no-prompt", "deploy", "-n", "every-5-min", "-n", "on-arrival"], project, env)
        watch = http_json(f"{api}/deployments/name/watch/every-5-min")
        assert watch["parameters"] == {"location": str(incoming)}
        assert [s["active"] for s in watch["schedules"]] == [False]  # shipped off
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

        said = []
        for cycle in range(3):
            run, lines = _run_watch(project, env)
            assert run["state_type"] == "COMPLETED", (cycle, run["state"], lines)
            said.append(next(line for line in lines if line.startswith("watch: ")))
        assert "first listing" in said[0] and "(3 images)" in said[0]
        assert all("no new images" in line for line in said[1:]), said
        arrived = {"filter": {"event": {"name": ["genderclf.data.arrived"]}}, "limit": 10}
        assert http_json(f"{api}/events/filter", arrived)["events"] == []
        on_arrival = http_json(f"{api}/deployments/name/monitor/on-arrival")
        assert not http_json(
            f"{api}/flow_runs/filter",
            {"flow_runs": {"deployment_id": {"any_": [on_arrival["id"]]}}},
        )

        # No location, or the workspace: refused in one line, nothing listed.
        for location, why in (("", "no location to list"), (str(project), "is the workspace")):
            run, lines = _run_watch(project, env, f"location={location}")
            assert run["state_type"] == "FAILED", run["state"]
            assert why in run["state"]["message"] and "\n" not in run["state"]["message"]
            (said,) = [line for line in lines if line.startswith("watch: ")]
            assert why in said and "\n" not in said, said
            # Under a worker, Prefect's engine ends every Failed flow run with its own
            # "Engine execution exited with unexpected exception" and a traceback of
            # Prefect's frames (state.result() re-raising the state); nothing of ours raised.
            tracebacks = [line for line in lines if "Traceback" in line]
            assert all(t.startswith("Engine execution exited") for t in tracebacks), tracebacks
            # (frames by their file: the message names the refused folder, and a checkout
            # may itself be named genderclf)
            frames = [f for t in tracebacks for f in re.findall(r'File "([^"]+)"', t)]
            ours = (str(project), str(REPO_ROOT / "src"), str(REPO_ROOT / "flows"))
            assert not [f for f in frames if f.startswith(ours)], tracebacks
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
