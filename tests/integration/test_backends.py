"""The scaled-out MLflow backend for real: PostgreSQL store, S3 artifacts, authentication.

The test starts, on loopback, the same pieces `docker/compose.yaml` runs in containers:

* a real PostgreSQL server (`initdb` + `pg_ctl` into a temporary folder; PostgreSQL refuses
  to run as root, so under root it runs as the unprivileged `nobody`);
* a real S3-protocol server (moto's server mode) with the artifact bucket;
* `mlflow server` started by `docker/mlflow-server.sh`, the compose stack's own entry point:
  PostgreSQL backend store, artifacts proxied to the bucket, basic authentication whose
  users also live in PostgreSQL.

Then the real `genderclf train`, `evaluate` and `register` commands run on the tiny sample
with nothing but `MLFLOW_TRACKING_URI` and the MLflow credentials in their environment (no
S3 credentials: the server proxies the artifacts). The champion is loaded back through the
server, the artifacts are found in the bucket with boto3, and the registry rows in
PostgreSQL.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import importlib.util
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from tests.helpers import BIN, REPO_ROOT, load_pyfunc
from tests.helpers.servers import MLFLOW_SERVER_ENV, Postgres, free_port, s3_client, s3_env
from tests.helpers.servers import s3_server as s3_server_at

from genderclf import config as C
from genderclf.tracking.setup import CHALLENGER, CHAMPION, EXPERIMENT, MODEL_NAME

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERVER_SCRIPT = REPO_ROOT / "docker" / "mlflow-server.sh"
BUCKET = "mlflow-artifacts"
ARTIFACT_PREFIX = "mlartifacts"
PG_USER, PG_PASSWORD = "mlflow", "pg-test-password"
ADMIN_USER, ADMIN_PASSWORD = "admin", "admin-test-password-1"
# MLflow's basic-auth app needs Flask-WTF (the `mlflow[auth]` extra). Without it the server
# runs with MLFLOW_AUTH=off and only the authentication test is skipped.
AUTH = importlib.util.find_spec("flask_wtf") is not None
NO_AUTH_REASON = (
    "Flask-WTF is not installed (mlflow[auth]): the server runs without authentication here"
)


def _pg_bin() -> Path | None:
    """The folder holding initdb/pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<v>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    candidates.sort(key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(candidates[-1]).parent if candidates else None


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A real PostgreSQL server on 127.0.0.1:<free port>, with databases mlflow and mlflow_auth."""
    pg_bin = _pg_bin()
    if pg_bin is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) are not installed; "
            "`apt-get install postgresql` (.ci/run does it)"
        )
    # PostgreSQL refuses to run as root: under root the server runs as `nobody`, in a folder
    # of its own outside pytest's root-only tmp tree.
    as_root = os.geteuid() == 0
    base = Path(tempfile.mkdtemp(prefix="genderclf-pg-"))
    prefix: list[str] = []
    if as_root:
        nobody = pwd.getpwnam("nobody")
        os.chown(base, nobody.pw_uid, nobody.pw_gid)
        prefix = ["runuser", "-u", "nobody", "--"]
    data, sock, log = base / "data", base / "sock", base / "server.log"

    def run(*args: str) -> None:
        proc = subprocess.run(
            [*prefix, *args], cwd=base, capture_output=True, text=True, timeout=120
        )
        if proc.returncode != 0:
            server_log = log.read_text() if log.exists() else ""
            raise AssertionError(
                f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n"
                f"{proc.stderr}\n{server_log}"
            )

    pwfile = base / "pw"
    pwfile.write_text(PG_PASSWORD + "\n")
    if as_root:
        os.chown(pwfile, nobody.pw_uid, nobody.pw_gid)
    run(
        str(pg_bin / "initdb"),
        "-D",
        str(data),
        "-U",
        PG_USER,
        f"--pwfile={pwfile}",
        "--auth-host=scram-sha-256",
        "--auth-local=peer",
        "-E",
        "UTF8",
        "--no-locale",
    )
    pwfile.unlink()
    run("mkdir", "-m", "700", str(sock))
    port = free_port()
    opts = f"-h 127.0.0.1 -p {port} -k {sock} -c fsync=off -c full_page_writes=off"
    run(
        str(pg_bin / "pg_ctl"),
        "-D",
        str(data),
        "-l",
        str(log),
        "-o",
        opts,
        "-w",
        "-t",
        "60",
        "start",
    )
    try:
        pg = Postgres(port, PG_USER, PG_PASSWORD)
        import psycopg2

        conn = psycopg2.connect(
            host="127.0.0.1", port=port, user=PG_USER, password=PG_PASSWORD, dbname="postgres"
        )
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE mlflow")
            cur.execute("CREATE DATABASE mlflow_auth")
        conn.close()
        yield pg
    finally:
        with contextlib.suppress(AssertionError):
            run(str(pg_bin / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """A real S3-protocol server (moto) on loopback with the artifact bucket; its endpoint."""
    with s3_server_at(BUCKET) as endpoint:
        yield endpoint


def _clean_env() -> dict[str, str]:
    """The environment without anything that would point at another store or cloud."""
    drop = ("MLFLOW_", "AWS_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, postgres, s3) -> Iterator[str]:
    """`docker/mlflow-server.sh` on loopback: PostgreSQL store, S3 artifacts, basic auth."""
    work = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {
        **_clean_env(),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "TMPDIR": str(work),
        "MLFLOW_BACKEND_STORE_URI": postgres.uri("mlflow"),
        "MLFLOW_AUTH_DATABASE_URI": postgres.uri("mlflow_auth"),
        "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/{ARTIFACT_PREFIX}",
        "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN_USER,
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key",
        "MLFLOW_HOST": "127.0.0.1",
        "MLFLOW_PORT": str(port),
        "MLFLOW_WORKERS": "1",
        "MLFLOW_AUTH": "on" if AUTH else "off",
        **MLFLOW_SERVER_ENV,
        # only the server talks to the object store
        "MLFLOW_S3_ENDPOINT_URL": s3,
        **s3_env(),
        "AWS_CONFIG_FILE": str(work / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(work / "no-aws-credentials"),
    }
    log_path = work / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["sh", str(SERVER_SCRIPT)],
            cwd=work,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise AssertionError(
                    f"mlflow server exited {proc.returncode}:\n{log_path.read_text()[-6000:]}"
                )
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{url}/health", timeout=5) as resp,
            ):
                if resp.status == 200:
                    break
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"mlflow server not healthy after 180 s:\n{log_path.read_text()[-6000:]}"
                )
            time.sleep(1)
        yield url
    finally:
        # the script execs mlflow, which runs uvicorn workers: stop the whole session group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


@pytest.fixture
def workspace(tmp_path, monkeypatch, model_settings, sample_data, prepared) -> Path:
    """A pipeline workspace after the data stages: params.yaml, data/raw, splits, prepared."""
    raw, splits = sample_data
    shutil.copytree(raw, tmp_path / C.PATHS.raw)
    shutil.copytree(splits, tmp_path / C.PATHS.splits)
    shutil.copytree(prepared, tmp_path / C.PATHS.prepared)
    # no floor, no calibration ceiling: one epoch on the tiny sample becomes the first champion
    settings = model_settings({"register.min_accuracy": 0.0, "register.max_ece": 1.0})
    (tmp_path / C.PATHS.params).write_text(
        yaml.safe_dump(settings.model_dump(by_alias=True), sort_keys=False)
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _client_env(url: str) -> dict[str, str]:
    """What a pipeline machine needs: the server URI and MLflow credentials, no S3 keys."""
    return {
        **_clean_env(),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": url,
        "MLFLOW_TRACKING_USERNAME": ADMIN_USER,
        "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD,
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_CONFIG_NOSYSTEM": "1",
    }


def _stage(workspace: Path, env: dict[str, str], stage: str) -> str:
    proc = subprocess.run(
        [str(BIN / "genderclf"), stage],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"genderclf {stage} exited {proc.returncode}\n--- stdout\n"
            f"{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc.stdout + proc.stderr


def _check_predictions(champion, workspace: Path) -> None:
    """Score three sample images with the model loaded from the registry: the registered
    pyfunc takes image file bytes (column `image`) and returns a label and p_male per row."""
    import pandas as pd

    assert champion.metadata.get_input_schema().input_names() == ["image"]
    files = sorted((workspace / C.PATHS.raw).rglob("*.jpg"))[:3]
    assert len(files) == 3
    served = champion.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}))
    assert len(served) == 3
    assert served["error"].isna().all(), served
    assert set(served["label"]) <= {"male", "female"}
    assert served["p_male"].between(0.0, 1.0).all()


@pytest.mark.skipif(not AUTH, reason=NO_AUTH_REASON)
def test_server_requires_authentication(mlflow_server):
    req = f"{mlflow_server}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 401
    for password, status in (("wrong-password", 401), (ADMIN_PASSWORD, 200)):
        token = base64.b64encode(f"{ADMIN_USER}:{password}".encode()).decode()
        request = urllib.request.Request(req, headers={"Authorization": f"Basic {token}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                got = resp.status
        except urllib.error.HTTPError as e:
            got = e.code
        assert got == status, password


def test_train_register_and_load_champion_through_the_server(
    workspace, mlflow_server, postgres, s3, monkeypatch
):
    env = _client_env(mlflow_server)
    for stage in ("train", "evaluate", "register"):
        _stage(workspace, env, stage)

    run = json.loads((workspace / C.PATHS.run).read_text())
    report = json.loads((workspace / C.PATHS.register_report).read_text())
    assert report["decision"] == "promoted", report
    version = report["version"]
    assert report["champion_after"] == version

    # the backend store is PostgreSQL: the run, the version and the aliases are rows there
    pg_runs = postgres.query(
        "mlflow", f"SELECT status FROM runs WHERE run_uuid = '{run['run_id']}'"
    )
    assert pg_runs == [("FINISHED",)]
    pg_versions = postgres.query("mlflow", "SELECT name, version, run_id FROM model_versions")
    assert (MODEL_NAME, int(version), run["run_id"]) in pg_versions
    pg_aliases = dict(
        postgres.query(
            "mlflow",
            f"SELECT alias, version FROM registered_model_aliases WHERE name = '{MODEL_NAME}'",
        )
    )
    assert pg_aliases[CHAMPION] == int(version) and pg_aliases[CHALLENGER] == int(version)
    if AUTH:
        assert (ADMIN_USER,) in postgres.query("mlflow_auth", "SELECT username FROM users")

    # load the champion back through the server, as a serving process would
    import mlflow

    for k in [k for k in os.environ if k.startswith(("MLFLOW_", "AWS_"))]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        if k.startswith("MLFLOW_"):
            monkeypatch.setenv(k, v)
    # set_*_uri also write MLFLOW_*_URI into os.environ: let monkeypatch own (and undo) them,
    # or later tests' subprocesses would inherit this server's address.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)
    try:
        experiment = mlflow.get_experiment_by_name(EXPERIMENT)
        assert experiment.artifact_location.startswith("mlflow-artifacts:")  # proxied
        champion = load_pyfunc(f"models:/{MODEL_NAME}@{CHAMPION}", workspace / "pyfunc")
        _check_predictions(champion, workspace)
        downloaded = Path(
            mlflow.artifacts.download_artifacts(
                f"models:/{MODEL_NAME}@{CHAMPION}", dst_path=str(workspace / "champion")
            )
        )
        model_files = {
            p.relative_to(downloaded).as_posix() for p in downloaded.rglob("*") if p.is_file()
        }
        assert "MLmodel" in model_files
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)

    # the artifacts are in the bucket, under the experiment and run of this training
    keys = []
    for page in (
        s3_client(s3)
        .get_paginator("list_objects_v2")
        .paginate(Bucket=BUCKET, Prefix=f"{ARTIFACT_PREFIX}/")
    ):
        keys += [o["Key"] for o in page.get("Contents", [])]
    run_prefix = f"{ARTIFACT_PREFIX}/{experiment.experiment_id}/{run['run_id']}/artifacts/"
    run_keys = {k.removeprefix(run_prefix) for k in keys if k.startswith(run_prefix)}
    assert {"plots/training_curves.png", "plots/history.csv"} <= run_keys, sorted(keys)
    # the champion is a LoggedModel of this run (MLflow 3: models:/<model id>), stored in
    # the bucket under the experiment's models/, and every file of it came from there
    # (`registered_model_meta` is written by the download itself)
    model_uri = report["model_uri"]
    assert model_uri.startswith("models:/m-"), report
    model_id = model_uri.removeprefix("models:/")
    mlflow.set_tracking_uri(mlflow_server)
    try:
        assert mlflow.get_logged_model(model_id).source_run_id == run["run_id"]
    finally:
        mlflow.set_tracking_uri(None)
    model_prefix = f"{ARTIFACT_PREFIX}/{experiment.experiment_id}/models/{model_id}/artifacts/"
    in_bucket = {k.removeprefix(model_prefix) for k in keys if k.startswith(model_prefix)}
    assert "MLmodel" in in_bucket, sorted(keys)
    assert model_files - {"registered_model_meta"} == in_bucket
    # and nothing was written to a local artifact folder on the client side
    assert not (workspace / "mlruns").exists() and not (workspace / "mlartifacts").exists()
