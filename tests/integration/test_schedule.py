"""The weekly schedule fires: a real Prefect server, `prefect deploy --all` of prefect.yaml.

Prefect 3.8's scheduler failed on SQLAlchemy 2.1 (`Can't evaluate bulk DML statement` in
`_insert_scheduled_flow_runs`, a traceback every loop) and created no scheduled run, so
`gender-pipeline/weekly` never ran. This deploys the repository's own prefect.yaml to a
server on loopback and waits for the server itself to create the runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
from tests.helpers import BIN, REPO_ROOT
from tests.helpers.servers import free_port, http_json, wait_http

pytestmark = pytest.mark.integration


def _prefect(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(
        [str(BIN / "prefect"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, (
        f"prefect {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


def test_server_creates_the_weekly_runs_from_prefect_yaml(tmp_path):
    project = tmp_path / "project"  # deploy from a copy: `prefect deploy` may write .prefect/
    project.mkdir()
    shutil.copy2(REPO_ROOT / "prefect.yaml", project / "prefect.yaml")
    for folder in ("flows", "src"):
        shutil.copytree(
            REPO_ROOT / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "GENDERCLF_REPO": str(project),
        "PYTHONPATH": f"{project}{os.pathsep}{project / 'src'}",
    }
    env.pop("GENDERCLF_WATCH", None)  # deployed as the docs' first commands do: unset
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_http(f"{api}/health", 120, server, log)
        for pool in ("cpu", "gpu"):
            _prefect(["work-pool", "create", pool, "--type", "process"], tmp_path, env)
        _prefect(["--no-prompt", "deploy", "--all"], project, env)
        weekly = http_json(f"{api}/deployments/name/gender-pipeline/weekly")
        assert weekly["schedules"] and weekly["schedules"][0]["active"]

        runs: list[dict] = []
        deadline = time.monotonic() + 90
        while not runs and time.monotonic() < deadline:
            runs = http_json(
                f"{api}/flow_runs/filter",
                {
                    "flow_runs": {"deployment_id": {"any_": [weekly["id"]]}},
                    "limit": 50,
                },
            )
            time.sleep(1)
        assert runs, f"no scheduled run after 90 s; server log:\n{log.read_text()[-4000:]}"
        assert {r["state_type"] for r in runs} == {"SCHEDULED"}
        for r in runs:  # every Monday 03:00 UTC, as the cron in prefect.yaml says
            start = datetime.fromisoformat(r["expected_start_time"].replace("Z", "+00:00"))
            assert (
                start.weekday(),
                start.hour,
                start.minute,
                start.utcoffset().total_seconds(),
            ) == (0, 3, 0, 0)
        time.sleep(3)  # one more scheduler loop
        # Neither the triggered deployment nor the watch, deployed without GENDERCLF_WATCH
        # (its schedule ships off: a watch of nothing once listed the whole checkout).
        watch = http_json(f"{api}/deployments/name/watch/every-5-min")
        assert [s["active"] for s in watch["schedules"]] == [False]
        for other in (http_json(f"{api}/deployments/name/gender-pipeline/on-demand"), watch):
            assert not http_json(
                f"{api}/flow_runs/filter",
                {"flow_runs": {"deployment_id": {"any_": [other["id"]]}}},
            ), other["name"]
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
    text = log.read_text()
    assert "Traceback" not in text, text[-4000:]
    assert "Can't evaluate bulk DML" not in text
