"""docker/compose.yaml brought up for real, with docker/test/compose.loopback.yaml on top:
PostgreSQL, the S3-protocol store, MLflow with authentication, the Prefect server and a CPU
worker come up healthy in their declared order; the worker clones the pipeline from
GENDERCLF_GIT_URL, deploys prefect.yaml's `on-demand` from its clone, and one flow run
through it registers a model in MLflow on PostgreSQL with its artifacts in the bucket; the
champion loads back through the MLflow server with the credentials of the `.env` file.

Compose here is Debian's docker-compose 1.29 (the Python implementation); users run the
same compose.yaml with Compose v2. Secrets are generated into a `.env` file in a temporary
folder, read from there only, and never shown: failure messages hide them.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.docker.engine import REPO_ROOT, SLOW, free_ports, hide
from tests.docker.pipeline_repo import IMAGE_UID, STAGES, git
from tests.docker.prefect_runs import (
    flow_run_logs,
    run_deployment,
    task_runs,
    wait_for_flow_run,
    wait_for_worker,
)
from tests.helpers import load_pyfunc
from tests.helpers.servers import Postgres

from genderclf import config as C
from genderclf.tracking.setup import CHALLENGER, CHAMPION, EXPERIMENT, MODEL_NAME

pytestmark = pytest.mark.docker

COMPOSE_FILES = (
    REPO_ROOT / "docker" / "compose.yaml",
    REPO_ROOT / "docker" / "test" / "compose.loopback.yaml",
)
SECRET_KEY = re.compile(r"PASSWORD|SECRET|AUTH_STRING|TOKEN")
LONG_RUNNING = ("postgres", "minio", "mlflow", "prefect-server")
STARTED = ("postgres", "minio", "minio-init", "mlflow", "prefect-server", "worker-cpu")


def write_env_file(path: Path, source: Path) -> dict[str, str]:
    """The stack's .env: .env.example with every placeholder replaced by a fresh random
    secret, a project name of its own, free loopback ports and the pipeline to clone."""
    env: dict[str, str] = {}
    for line in (REPO_ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = secrets.token_hex(16) if "change-me" in value else value
    env["PREFECT_AUTH_STRING"] = f"admin:{secrets.token_hex(16)}"
    pg, s3, mlflow, prefect = free_ports(4)
    env.update(
        COMPOSE_PROJECT_NAME=f"genderclftest{uuid.uuid4().hex[:8]}",
        POSTGRES_PORT=str(pg),
        S3_PORT=str(s3),
        MLFLOW_PORT=str(mlflow),
        PREFECT_PORT=str(prefect),
        GENDERCLF_SOURCE=str(source),
        GENDERCLF_GIT_URL="/source",
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.writelines(f"{k}={v}\n" for k, v in env.items())
    return env


@dataclass
class Stack:
    """The running test stack: its settings (from the .env file) and how to reach it."""

    env: dict[str, str]
    compose_cli: str
    env_file: Path
    config_file: Path
    events: list[dict[str, Any]]

    @property
    def secrets(self) -> list[str]:
        return [v for k, v in self.env.items() if SECRET_KEY.search(k)]

    def compose(
        self, *args: str, timeout: float = SLOW, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return compose(
            self.compose_cli,
            self.env,
            "--env-file",
            str(self.env_file),
            "-f",
            str(self.config_file),
            *args,
            timeout=timeout,
            check=check,
        )

    def url(self, service: str) -> str:
        port = {"mlflow": "MLFLOW_PORT", "prefect": "PREFECT_PORT", "s3": "S3_PORT"}[service]
        return f"http://127.0.0.1:{self.env[port]}"

    def prefect_headers(self) -> dict[str, str]:
        token = base64.b64encode(self.env["PREFECT_AUTH_STRING"].encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def container(self, service: str) -> str:
        ids = self.compose("ps", "-q", service, timeout=120).stdout.split()
        assert ids, f"no container of {service}"
        return ids[0]

    def logs(self) -> str:
        out = self.compose("logs", "--no-color", "--tail", "40", timeout=300, check=False)
        return hide(out.stdout + out.stderr, self.secrets)[-12000:]


def compose(
    cli: str, env: dict[str, str], *args: str, timeout: float = SLOW, check: bool = True
) -> subprocess.CompletedProcess[str]:
    # The .env file is the only source of the stack's settings: drop same-named variables
    # of this process. Creating a container copies 3.6 GB on vfs: raise Compose's timeout.
    process_env = {k: v for k, v in os.environ.items() if k not in env}
    process_env.update(COMPOSE_HTTP_TIMEOUT=str(SLOW), DOCKER_BUILDKIT="1")
    proc = subprocess.run(
        [cli, *args], capture_output=True, text=True, timeout=timeout, env=process_env
    )
    if check and proc.returncode != 0:
        secret_values = [v for k, v in env.items() if SECRET_KEY.search(k)]
        raise AssertionError(
            hide(
                f"docker-compose {' '.join(args[-3:])} exited "
                f"{proc.returncode}\n{proc.stdout[-4000:]}\n"
                f"{proc.stderr[-4000:]}",
                secret_values,
            )
        )
    return proc


def loopback_config(cli: str, env: dict[str, str], env_file: Path, out: Path) -> dict[str, Any]:
    """compose.yaml + compose.loopback.yaml, as docker-compose itself merges them, written to
    `out` without `ports:` (mode 0600: it holds the interpolated secrets).

    Under host networking a published port means nothing (Compose v2 drops it with a
    warning), but docker-compose 1.29's Docker client refuses the pair outright ("host
    network_mode is incompatible with port_bindings"), and an override cannot remove a key
    in 1.29 (v2's `!reset` is the way there). So the merged file goes without them.
    """
    files = [a for f in COMPOSE_FILES for a in ("-f", str(f))]
    merged = compose(cli, env, "--env-file", str(env_file), *files, "config", timeout=120)
    config = yaml.safe_load(merged.stdout)
    for svc in config["services"].values():
        svc.pop("ports", None)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return config


def _events(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        e = json.loads(line)
        attrs = e["Actor"]["Attributes"]
        out.append(
            {
                "service": attrs.get("com.docker.compose.service"),
                "status": e["status"],
                "exit": attrs.get("exitCode"),
                "t": e["timeNano"],
            }
        )
    return out


@pytest.fixture(scope="module")
def stack(engine, cpu_image, stand_in_images, pipeline_source, tmp_path_factory) -> Iterator[Stack]:
    cli = shutil.which("docker-compose")
    if cli is None:
        pytest.fail("docker-compose is not installed: `apt-get install docker-compose`")
    work = tmp_path_factory.mktemp("stack")
    env_file = work / ".env"
    env = write_env_file(env_file, pipeline_source)
    config_file = work / "compose.merged.yaml"
    config = loopback_config(cli, env, env_file, config_file)
    assert {s["network_mode"] for s in config["services"].values()} == {"host"}
    images = [s["image"] for s in config["services"].values() if "profiles" not in s]
    need = engine.disk_for_containers(images)
    free = engine.free_bytes()
    if free < need:
        pytest.fail(
            f"the stack's {len(images)} containers need about {need / 1e9:.0f} GB in Docker's "
            f"data root, which has {free / 1e9:.1f} GB free (the vfs driver copies an image "
            "twice for each container): free some disk, or use an engine with overlay2"
        )
    events_log = work / "events.jsonl"
    project = env["COMPOSE_PROJECT_NAME"]
    with open(events_log, "w") as out:  # start, exit and health of the project's containers
        watcher = subprocess.Popen(
            [
                engine.cli,
                "events",
                "--format",
                "{{json .}}",
                "--filter",
                "type=container",
                "--filter",
                f"label=com.docker.compose.project={project}",
                "--filter",
                "event=start",
                "--filter",
                "event=die",
                "--filter",
                "event=health_status",
            ],
            stdout=out,
            stderr=subprocess.DEVNULL,
        )
    stack = Stack(env, cli, env_file, config_file, [])
    try:
        try:
            start = time.monotonic()
            stack.compose("up", "--detach", "--no-build", timeout=2 * SLOW)
            print(f"\ncompose up: {time.monotonic() - start:.0f} s")
        finally:
            time.sleep(2)
            watcher.terminate()
            watcher.wait(timeout=30)
        stack.events = _events(events_log)
        yield stack
    finally:
        if os.environ.get("GENDERCLF_KEEP_STACK") != "1":
            stack.compose("down", "--volumes", "--timeout", "20", timeout=2 * SLOW, check=False)
        for secret_file in (env_file, config_file):
            secret_file.unlink(missing_ok=True)


def test_stack_comes_up_healthy_in_order_on_loopback_only(engine, stack):
    config = yaml.safe_load(stack.config_file.read_text())
    services = config["services"]
    # every container is the project's, named by COMPOSE_PROJECT_NAME from the .env file
    project = stack.env["COMPOSE_PROJECT_NAME"]
    for service in STARTED:
        labels = engine.inspect(stack.container(service))["Config"]["Labels"]
        assert labels["com.docker.compose.project"] == project, service
    assert "worker-gpu" not in {e["service"] for e in stack.events}  # the `gpu` profile
    # the host's network only: no bridge network was created for the project
    assert engine.networks() <= {"host", "none"}, engine.networks()

    def first(service: str, status: str, exit_code: str | None = None) -> int | None:
        times = [
            e["t"]
            for e in stack.events
            if e["service"] == service
            and e["status"] == status
            and (exit_code is None or e["exit"] == exit_code)
        ]
        return min(times) if times else None

    for service in STARTED:
        started = first(service, "start")
        assert started, f"{service} never started"
        for dep, spec in (services[service].get("depends_on") or {}).items():
            condition = spec["condition"]
            ready = {
                "service_healthy": first(dep, "health_status: healthy"),
                "service_completed_successfully": first(dep, "die", "0"),
                "service_started": first(dep, "start"),
            }[condition]
            assert ready is not None and ready <= started, (
                f"{service} started before {dep} was {condition}"
            )
    for service in LONG_RUNNING:
        state = engine.inspect(stack.container(service))["State"]
        assert state["Running"] and state["Health"]["Status"] == "healthy", service
    init = engine.inspect(stack.container("minio-init"))["State"]
    assert (init["Status"], init["ExitCode"]) == ("exited", 0)
    assert engine.inspect(stack.container("worker-cpu"))["State"]["Running"]

    # each server on its own loopback port, authentication on where the stack sets it
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(f"{stack.url('prefect')}/api/flows/filter", data=b"{}", timeout=10)
    assert denied.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(
            f"{stack.url('mlflow')}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10
        )
    assert denied.value.code == 401


@pytest.fixture(scope="module")
def flow_run(stack) -> dict[str, Any]:
    """One run of the on-demand deployment (prefect.yaml), deployed from the worker's clone
    and run by the worker container; the flow run as the Prefect server has it."""
    api, headers = f"{stack.url('prefect')}/api", stack.prefect_headers()
    worker = stack.container("worker-cpu")

    def gone() -> str | None:
        proc = stack.compose(
            "ps", "-q", "--filter", "status=running", "worker-cpu", timeout=120, check=False
        )
        return None if worker in proc.stdout else f"worker-cpu stopped:\n{stack.logs()}"

    wait_for_worker(api, "cpu", 600, headers, alive=gone)
    deployed = stack.compose(
        "exec",
        "-T",
        "worker-cpu",
        "prefect",
        "--no-prompt",
        "deploy",
        "--name",
        "on-demand",
        timeout=300,
    )
    assert "gender-pipeline/on-demand" in deployed.stdout
    run_id = run_deployment(api, "gender-pipeline/on-demand", headers)
    run = wait_for_flow_run(api, run_id, 1500, headers, alive=gone)
    assert run["state_type"] == "COMPLETED", hide(
        f"{run['state_type']}: {run['state']['message']}\n"
        f"{flow_run_logs(api, run_id, headers)}\n{stack.logs()}",
        stack.secrets,
    )
    tasks = task_runs(api, run_id, headers)
    assert {s: tasks.get(s) for s in STAGES} == dict.fromkeys(STAGES, "COMPLETED"), tasks
    return run


def test_the_worker_ran_the_flow_in_its_clone_of_the_source(stack, flow_run, pipeline_source):
    # The worker cloned GENDERCLF_GIT_URL (the read-only /source) into its empty /workspace
    # volume at start, deployed prefect.yaml's `on-demand` from that clone, and the flow ran
    # there as the image's user: the commit, the params, every stage in dvc.lock.
    def worker(*command: str) -> str:
        return stack.compose("exec", "-T", "worker-cpu", *command, timeout=120).stdout

    assert flow_run["work_pool_name"] == "cpu"
    head = git(pipeline_source, "rev-parse", "HEAD").strip()
    assert worker("git", "-C", "/workspace", "rev-parse", "HEAD").strip() == head
    assert worker("cat", "/workspace/params.yaml") == (pipeline_source / "params.yaml").read_text()
    lock = yaml.safe_load(worker("cat", "/workspace/dvc.lock"))
    assert set(lock["stages"]) == set(STAGES)
    owners = worker("stat", "-c", "%u", "/workspace/dvc.lock", "/workspace/models/model.keras")
    assert owners.split() == [str(IMAGE_UID)] * 2
    report = json.loads(worker("cat", f"/workspace/{C.PATHS.register_report}"))
    assert (report["decision"], report["version"]) == ("promoted", "1")


def _postgres(stack: Stack, database: str, sql: str) -> list[tuple]:
    env = stack.env
    server = Postgres(int(env["POSTGRES_PORT"]), env["POSTGRES_USER"], env["POSTGRES_PASSWORD"])
    return server.query(database, sql)


def test_a_flow_run_registers_a_champion_in_postgres_with_artifacts_in_the_bucket(
    stack, flow_run, monkeypatch, tmp_path, make_image
):
    # the registry is in PostgreSQL: the version, its run, the aliases; and Prefect's run
    versions = _postgres(stack, "mlflow", "SELECT name, version, run_id FROM model_versions")
    assert [(n, v) for n, v, _ in versions] == [(MODEL_NAME, 1)], versions
    run_id = versions[0][2]
    aliases = dict(
        _postgres(stack, "mlflow", "SELECT alias, version FROM registered_model_aliases")
    )
    assert aliases == {CHAMPION: 1, CHALLENGER: 1}
    assert _postgres(stack, "mlflow", f"SELECT status FROM runs WHERE run_uuid = '{run_id}'") == [
        ("FINISHED",)
    ]
    assert (stack.env["MLFLOW_ADMIN_USERNAME"],) in _postgres(
        stack, "mlflow_auth", "SELECT username FROM users"
    )
    assert _postgres(
        stack, "prefect", f"SELECT state_type FROM flow_run WHERE id = '{flow_run['id']}'"
    ) == [("COMPLETED",)]

    # load the champion back through the MLflow server, with the .env file's credentials
    import mlflow
    import pandas as pd

    for k in [k for k in os.environ if k.startswith(("MLFLOW_", "AWS_"))]:
        monkeypatch.delenv(k)
    url = stack.url("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", stack.env["MLFLOW_ADMIN_USERNAME"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", stack.env["MLFLOW_ADMIN_PASSWORD"])
    mlflow.set_tracking_uri(url)
    mlflow.set_registry_uri(url)
    try:
        experiment = mlflow.get_experiment_by_name(EXPERIMENT)
        assert experiment.artifact_location.startswith("mlflow-artifacts:")  # proxied to S3
        champion = load_pyfunc(f"models:/{MODEL_NAME}@{CHAMPION}", tmp_path / "champion")
        run = mlflow.get_run(run_id)
        # MLflow 3: the run's models are LoggedModels (models:/m-...), stored apart from it
        model_ids = [
            m.model_id
            for m in mlflow.search_logged_models(
                experiment_ids=[experiment.experiment_id], output_format="list"
            )
            if m.source_run_id == run_id
        ]
        assert model_ids, "the flow's run logged no model"
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    assert run.data.tags["prefect.flow_run_id"] == flow_run["id"]
    images = [make_image(tmp_path / f"{i}.jpg", seed=i).read_bytes() for i in range(3)]
    served = champion.predict(pd.DataFrame({"image": images}))
    assert len(served) == 3 and served["error"].isna().all(), served
    assert set(served["label"]) <= {"male", "female"}
    assert served["p_male"].between(0.0, 1.0).all()

    # the artifacts are in the bucket, under this experiment and run (checked with boto3)
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=stack.url("s3"),
        region_name=stack.env["S3_REGION"],
        aws_access_key_id=stack.env["S3_ACCESS_KEY_ID"],
        aws_secret_access_key=stack.env["S3_SECRET_ACCESS_KEY"],
    )
    prefix = f"mlartifacts/{experiment.experiment_id}/{run_id}/artifacts/"
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=stack.env["MLFLOW_BUCKET"], Prefix=prefix
        )
        for o in page.get("Contents", [])
    ]
    names = {k.removeprefix(prefix) for k in keys}
    assert {"metrics/eval.json", "plots/history.csv"} <= names, sorted(names)
    for model_id in model_ids:
        model_prefix = f"mlartifacts/{experiment.experiment_id}/models/{model_id}/artifacts/"
        model_keys = [
            o["Key"]
            for page in s3.get_paginator("list_objects_v2").paginate(
                Bucket=stack.env["MLFLOW_BUCKET"], Prefix=model_prefix
            )
            for o in page.get("Contents", [])
        ]
        assert f"{model_prefix}MLmodel" in model_keys, sorted(model_keys)
