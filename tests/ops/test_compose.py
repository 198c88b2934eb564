"""docker/compose.yaml and .env.example, checked statically (no Docker engine needed).

The compose file must parse, reference only services, volumes and variables it defines
(variables in `.env.example`), start services in order behind health checks, take every
secret from the `.env` file, and give the GPU worker a GPU device request. It must stay
valid for Compose v2 and for the docker-compose 1.29 the Docker tests use. The tests' override
(docker/test/compose.loopback.yaml) must keep every service on the host's loopback.
tests/docker/test_compose_stack.py brings the stack up for real (`make test-docker`).
"""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest
import yaml
from tests.helpers import REPO_ROOT

COMPOSE = REPO_ROOT / "docker" / "compose.yaml"
LOOPBACK = REPO_ROOT / "docker" / "test" / "compose.loopback.yaml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}; `$$` is a literal `$`.
VAR_REF = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
SECRET_KEY = re.compile(r"PASSWORD|SECRET|AUTH_STRING|TOKEN", re.IGNORECASE)
EXPECTED_SERVICES = {
    "postgres",
    "minio",
    "minio-init",
    "mlflow",
    "prefect-server",
    "worker-cpu",
    "worker-gpu",
}


@pytest.fixture(scope="module")
def text() -> str:
    return COMPOSE.read_text()


@pytest.fixture(scope="module")
def compose(text) -> dict[str, Any]:
    return yaml.safe_load(text)


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: not KEY=value: {line!r}"
            assert key not in out, f".env.example: {key} twice"
            out[key] = value
    return out


def _strings(node: Any) -> list[str]:
    """Every string anywhere in a parsed YAML tree (keys of mappings excluded)."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    dep = service.get("depends_on") or {}
    if isinstance(dep, list):
        return dict.fromkeys(dep, "service_started")
    return {name: (opts or {}).get("condition", "service_started") for name, opts in dep.items()}


def test_parses_with_the_expected_services(services):
    assert set(services) == EXPECTED_SERVICES
    for name, svc in services.items():
        assert svc.get("image") or svc.get("build"), f"{name}: neither image nor build"


def test_images_are_pinned(services):
    for name, svc in services.items():
        image = svc["image"]
        if svc.get("build"):
            assert image.startswith("genderclf:"), f"{name}: locally built image {image}"
            continue
        tag = image.rpartition(":")[2]
        assert ":" in image and tag not in ("latest", ""), f"{name}: unpinned image {image}"


def test_build_contexts_and_dockerfiles_exist(services):
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            context = (COMPOSE.parent / build["context"]).resolve()
            assert context == REPO_ROOT, f"{name}: build context {context}"
            assert (context / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']}"
    assert services["worker-gpu"]["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    assert services["worker-cpu"]["build"]["dockerfile"] == "docker/Dockerfile"


def test_depends_on_only_defined_services_with_checkable_conditions(services):
    for name, svc in services.items():
        for dep, condition in _depends_on(svc).items():
            assert dep in services, f"{name} depends on undefined service {dep}"
            assert dep != name
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}'s health check"
            elif condition == "service_completed_successfully":
                assert services[dep].get("restart", "no") == "no", f"{dep} is one-shot"
            else:
                assert condition == "service_started", f"{name}: {condition}"


def test_start_order_is_acyclic_and_behind_health_checks(services):
    order: list[str] = []
    remaining = dict(services)
    while remaining:
        ready = [n for n, s in remaining.items() if set(_depends_on(s)) <= set(order)]
        assert ready, f"dependency cycle among {sorted(remaining)}"
        order += sorted(ready)
        for n in ready:
            del remaining[n]
    for long_running in ("postgres", "minio", "mlflow", "prefect-server"):
        check = services[long_running]["healthcheck"]["test"]
        assert check and check[0] in ("CMD", "CMD-SHELL"), long_running
    assert _depends_on(services["mlflow"]) == {
        "postgres": "service_healthy",
        "minio-init": "service_completed_successfully",
    }
    assert _depends_on(services["prefect-server"]) == {"postgres": "service_healthy"}
    for worker in ("worker-cpu", "worker-gpu"):
        deps = _depends_on(services[worker])
        assert deps["mlflow"] == deps["prefect-server"] == "service_healthy", worker


def test_named_volumes_are_declared_and_used(compose, services):
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, svc in services.items():
        for vol in svc.get("volumes") or []:
            source = vol["source"] if isinstance(vol, dict) else vol.split(":", 1)[0]
            if source.startswith((".", "/", "$", "~")):
                if not source.startswith("$"):
                    assert (COMPOSE.parent / source).exists(), f"{name}: bind mount {source}"
                continue
            assert source in declared, f"{name} uses undeclared volume {source}"
            used.add(source)
    assert used == declared, f"declared but unused: {declared - used}"


def test_every_variable_is_in_env_example_and_every_setting_is_used(text, env_example):
    refs = {m.group(1) for m in VAR_REF.finditer(text)}
    assert refs, "no ${VAR} references found"
    missing = refs - set(env_example)
    assert not missing, f"compose.yaml uses variables .env.example does not define: {missing}"
    # COMPOSE_* are Compose's own settings (read from the env file), not interpolated
    unused = {k for k in set(env_example) - refs if not k.startswith("COMPOSE_")}
    assert not unused, f".env.example defines variables compose.yaml never uses: {unused}"
    # a bare `$VAR` would be interpolated by compose too; the file always spells ${VAR} or $$
    bare = re.findall(r"(?<!\$)\$(?![{$])[A-Za-z_]", text)
    assert not bare, f"bare $VAR references: {bare}"


def test_secrets_come_only_from_the_env_file(services, env_example, text):
    required = {m.group(1) for m in VAR_REF.finditer(text) if m.group(2) in (":?", "?")}
    for name, svc in services.items():
        for key, value in _environment(svc).items():
            if SECRET_KEY.search(key):
                refs = [m for m in VAR_REF.finditer(value)]
                assert refs, f"{name}: {key} is not taken from .env: {value!r}"
                assert all(m.group(2) == ":?" for m in refs), (
                    f"{name}: {key} must be required (${{VAR:?...}}), not defaulted: {value!r}"
                )
            # credentials inside URLs: user:password@ must be interpolated
            for m in re.finditer(r"://([^/@\s]+)@", value):
                creds = m.group(1)
                assert VAR_REF.search(creds.partition(":")[2]), (
                    f"{name}: {key} has a literal password"
                )
    secrets = {k for k in env_example if SECRET_KEY.search(k)}
    assert secrets <= required, f"secrets with a default in compose.yaml: {secrets - required}"
    for key in secrets:
        assert "change-me" in env_example[key], f".env.example: {key} is not a placeholder"


def test_env_file_is_git_ignored_and_kept_out_of_images():
    for path in (".env", "docker/.env"):
        proc = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO_ROOT)
        assert proc.returncode == 0, f"{path} must be git-ignored"
    dockerignore = (REPO_ROOT / ".dockerignore").read_text().split()
    assert ".env" in dockerignore


def test_mlflow_server_uses_postgres_s3_and_authentication(services):
    mlflow = services["mlflow"]
    env = _environment(mlflow)
    assert mlflow["command"] == ["mlflow-server"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert env["MLFLOW_BACKEND_STORE_URI"].endswith("@postgres:5432/mlflow")
    assert env["MLFLOW_AUTH_DATABASE_URI"].endswith("@postgres:5432/mlflow_auth")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env.get("MLFLOW_AUTH", "on") == "on"  # authentication stays on in the stack
    prefect = _environment(services["prefect-server"])
    assert prefect["PREFECT_SERVER_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert prefect["PREFECT_SERVER_DATABASE_CONNECTION_URL"].endswith("@postgres:5432/prefect")
    # the databases the services use are the ones postgres creates at first start
    pg_dbs = _environment(services["postgres"])["POSTGRES_EXTRA_DATABASES"].split()
    assert {"mlflow", "mlflow_auth", "prefect"} <= set(pg_dbs)
    init = services["minio-init"]["command"][0]
    for bucket_var in ("MLFLOW_BUCKET", "DVC_BUCKET"):
        assert f"local/$${bucket_var}" in init
    assert (
        _environment(services["minio-init"])["MLFLOW_BUCKET"] in env["MLFLOW_ARTIFACTS_DESTINATION"]
    )


def test_workers_serve_the_pools_of_prefect_yaml(services):
    deployments = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())["deployments"]
    pools = {d["work_pool"]["name"] for d in deployments}
    served = {}
    for name in ("worker-cpu", "worker-gpu"):
        cmd = services[name]["command"]
        assert cmd[0] == "worker"
        served[name] = cmd[cmd.index("--pool") + 1]
        env = _environment(services[name])
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert env["DVC_REMOTE_URL"].startswith("s3://")
    assert set(served.values()) == pools == {"cpu", "gpu"}
    assert served == {"worker-cpu": "cpu", "worker-gpu": "gpu"}


def test_gpu_worker_requests_the_gpus_and_cpu_worker_does_not(services):
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert "deploy" not in services["worker-cpu"]
    assert services["worker-gpu"]["image"] == "genderclf:gpu"


def test_host_ports_bind_to_loopback(services):
    for name, svc in services.items():
        for port in svc.get("ports") or []:
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on all interfaces"


def test_valid_for_compose_1_29_too(compose, env_example):
    """docker-compose 1.29 rejects a top-level `name:`; both implementations read the
    project name from COMPOSE_PROJECT_NAME in the env file instead."""
    assert set(compose) <= {"services", "volumes", "networks", "configs", "secrets"} | {
        k for k in compose if k.startswith("x-")
    }
    assert "version" not in compose and "name" not in compose
    assert env_example["COMPOSE_PROJECT_NAME"] == "genderclf"


@pytest.fixture(scope="module")
def loopback() -> dict[str, Any]:
    return yaml.safe_load(LOOPBACK.read_text())


def test_loopback_override_puts_every_service_on_the_host_network(loopback, services):
    assert set(loopback["services"]) == set(services)
    assert "networks" not in loopback
    for name, svc in loopback["services"].items():
        assert svc["network_mode"] == "host", name
        assert "networks" not in svc and "ports" not in svc, name


def test_loopback_override_addresses_only_127_0_0_1(loopback, services):
    """Every address of a service name (http://mlflow:5000, @postgres:5432, ...) in the
    stack is rewritten to 127.0.0.1:<port> by the override, each server listens on
    127.0.0.1, and no address outside loopback appears."""
    text = LOOPBACK.read_text()
    hosts = re.findall(r"(?:://|@)([A-Za-z0-9_.-]+)(?::|/)", text)
    assert hosts and set(hosts) == {"127.0.0.1"}, hosts
    assert not re.search(r"\b(10|172|192\.168|0\.0\.0)\.\d", text)
    merged_env = {
        name: {**_environment(svc), **_environment(loopback["services"][name])}
        for name, svc in services.items()
    }
    for name, env in merged_env.items():
        for key, value in env.items():
            for host in re.findall(r"(?:://|@)([A-Za-z0-9_.-]+)(?::|/)", value):
                assert host not in services, f"{name}: {key} still names service {host}"
    assert merged_env["mlflow"]["MLFLOW_HOST"] == "127.0.0.1"
    assert merged_env["prefect-server"]["PREFECT_SERVER_API_HOST"] == "127.0.0.1"
    command = loopback["services"]["postgres"]["command"]
    assert "listen_addresses=127.0.0.1" in command
    assert loopback["services"]["minio"]["command"][:2] == ["-H", "127.0.0.1"]
    # the ports: one variable each, with distinct defaults
    ports = dict(re.findall(r"\$\{((?:POSTGRES|S3|MLFLOW|PREFECT)_PORT):-(\d+)\}", text))
    assert set(ports) == {"POSTGRES_PORT", "S3_PORT", "MLFLOW_PORT", "PREFECT_PORT"}
    assert len(set(ports.values())) == len(ports)
    for healthcheck in (
        loopback["services"][n]["healthcheck"]["test"]
        for n in ("minio", "mlflow", "prefect-server")
    ):
        assert "http://127.0.0.1:${" in healthcheck[-1]


def test_loopback_override_keeps_secrets_in_the_env_file(loopback):
    for name, svc in loopback["services"].items():
        for key, value in _environment(svc).items():
            for m in re.finditer(r"://([^/@\s]+)@", value):
                password = m.group(1).partition(":")[2]
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]*\}", password), f"{name}: {key}"
            assert not SECRET_KEY.search(key), f"{name}: {key} set by the override"
