"""Prefect's REST API on loopback, as the Docker tests use it: wait for a worker to join a
pool, start a run of a deployment, wait for the run to end, read its task runs."""

from __future__ import annotations

import time
import urllib.error
from collections.abc import Callable
from typing import Any

from tests.docker.engine import http_json

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def wait_for_worker(
    api: str,
    pool: str,
    timeout: float,
    headers: dict[str, str] | None = None,
    alive: Callable[[], str | None] | None = None,
) -> dict[str, Any]:
    """The first ONLINE worker of `pool` (its heartbeat reached the server)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            workers = http_json(f"{api}/work_pools/{pool}/workers/filter", {}, headers)
        except urllib.error.HTTPError as err:
            if err.code != 404:  # 404: the worker has not created its pool yet
                raise
            workers = []
        except OSError:
            workers = []
        online = [w for w in workers if w.get("status") == "ONLINE"]
        if online:
            return online[0]
        if alive is not None and (why := alive()):
            raise AssertionError(why)
        if time.monotonic() > deadline:
            raise TimeoutError(f"no worker of pool {pool!r} online after {timeout:.0f} s")
        time.sleep(2)


def run_deployment(api: str, name: str, headers: dict[str, str] | None = None) -> str:
    """Start a run of deployment `flow/deployment` now; its flow run id."""
    deployment = http_json(f"{api}/deployments/name/{name}", headers=headers)
    run = http_json(f"{api}/deployments/{deployment['id']}/create_flow_run", {}, headers)
    return run["id"]


def wait_for_flow_run(
    api: str,
    run_id: str,
    timeout: float,
    headers: dict[str, str] | None = None,
    alive: Callable[[], str | None] | None = None,
) -> dict[str, Any]:
    """The flow run once it is in a terminal state (COMPLETED, FAILED, CRASHED, CANCELLED)."""
    deadline = time.monotonic() + timeout
    while True:
        run = http_json(f"{api}/flow_runs/{run_id}", headers=headers)
        if run["state_type"] in TERMINAL:
            return run
        if alive is not None and (why := alive()):
            raise AssertionError(why)
        if time.monotonic() > deadline:
            raise TimeoutError(f"flow run {run_id} still {run['state_type']} after {timeout:.0f} s")
        time.sleep(5)


def task_runs(api: str, run_id: str, headers: dict[str, str] | None = None) -> dict[str, str]:
    """{task run name: state type} of a flow run."""
    runs = http_json(
        f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}, "limit": 200}, headers
    )
    return {r["name"]: r["state_type"] for r in runs}


def flow_run_logs(
    api: str, run_id: str, headers: dict[str, str] | None = None, limit: int = 40
) -> str:
    """The last `limit` log lines of a flow run (for failure messages)."""
    logs = http_json(
        f"{api}/logs/filter",
        {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_DESC", "limit": limit},
        headers,
    )
    return "\n".join(entry["message"] for entry in reversed(logs))
