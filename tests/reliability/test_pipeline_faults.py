"""One pipeline run, in a temporary git repository, that serves two checks:

* Training killed with SIGKILL mid-run by the OS (as an OOM kill), then `dvc repro` again:
  it resumes from the last completed epoch, says so, finishes, and the outputs match
  `dvc.lock`.
* Secrets: with canary values in `KAGGLE_KEY`, `AWS_SECRET_ACCESS_KEY` and the MLflow
  password in the environment of every stage, nothing the run leaves (MLflow params, tags,
  artifacts, Prefect logs, reports/, metrics/, plots/, stdout/stderr) contains them.

The run: `dvc repro` (killed in train) -> `dvc repro train` (resumes) -> the Prefect flow
`python flows/pipeline.py` (evaluate and register; everything else is cached), all against
one real MLflow server and Prefect's own temporary API server.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.helpers import BIN
from tests.helpers.params import pipeline_params
from tests.helpers.servers import delete_registered_model
from tests.helpers.workspace import (
    copy_pipeline,
    git_init,
    nothing_stale,
    pipeline_env,
    write_params,
)
from tests.helpers.workspace import run as run_in

from genderclf import config as C

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CANARIES = {
    "KAGGLE_KEY": "kaggle-canary-7f3a9c11e2",
    "AWS_SECRET_ACCESS_KEY": "aws-canary-51bd02f9aa",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-canary-c0ffee4242",
}


def _env(repo: Path, tracking_uri: str) -> dict[str, str]:
    return pipeline_env(
        repo,
        drop=("MLFLOW_", "PREFECT_", "PYTHONPATH"),
        **CANARIES,
        KAGGLE_USERNAME="canary-user",
        AWS_ACCESS_KEY_ID="AKIACANARY0000000000",
        MLFLOW_TRACKING_USERNAME="pipeline",
        MLFLOW_TRACKING_URI=tracking_uri,
        PREFECT_HOME=str(repo.parent / "prefect-home"),
        # Prefect's temporary API server gets 20 s to start by default: too few on a busy box.
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
    )


def _run(repo: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_in(repo, *args, env=env, timeout=600)


def _train_process(repo: Path) -> int | None:
    """The pid of the train stage's process DVC started in `repo`, if running
    (`python -m genderclf.pipeline train`)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            args = (d / "cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(d / "cwd")
        except OSError:
            continue
        if cwd == str(repo) and b"genderclf.pipeline" in args and b"train" in args:
            return int(d.name)
    return None


def _history_rows(repo: Path) -> int:
    files = list((repo / ".cache" / "train").glob("*/history.csv"))
    return max((len(f.read_text().splitlines()) - 1 for f in files), default=0)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, mlflow_server) -> dict[str, Any]:
    repo = tmp_path_factory.mktemp("faults") / "repo"
    copy_pipeline(repo, ("src", "flows"))
    params = pipeline_params(
        {"train.batch_size": 16, "train.epochs_head": 3, "train.early_stopping_patience": 10}
    )
    write_params(repo, params)
    env = _env(repo, mlflow_server.uri)
    git_init(repo, env=env)
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server.uri
    try:
        delete_registered_model()
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]

    # 1. `dvc repro`; SIGKILL the train stage once its first epoch is logged
    first = subprocess.Popen(
        [str(BIN / "dvc"), "repro"],
        cwd=repo,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline, pid, train_env = time.monotonic() + 540, None, b""
    while time.monotonic() < deadline and first.poll() is None:
        pid = pid or _train_process(repo)
        if pid and not train_env:
            train_env = Path(f"/proc/{pid}/environ").read_bytes()
        if pid and _history_rows(repo) >= 1:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    out1, err1 = first.communicate(timeout=120)
    assert pid is not None and first.returncode != 0, out1 + err1
    killed_after = _history_rows(repo)

    # 2. `dvc repro train` again: resumes
    second = _run(repo, env, str(BIN / "dvc"), "repro", "train")
    # 3. the Prefect flow runs what is left (evaluate, register), DVC skipping the rest
    third = _run(repo, env, sys.executable, "flows/pipeline.py")
    return {
        "repo": repo,
        "env": env,
        "first": (out1, err1),
        "second": second,
        "third": third,
        "killed_after": killed_after,
        "train_env": train_env,
        "server": mlflow_server,
    }


def test_killed_training_resumes_and_the_outputs_match_dvc_lock(pipeline):
    repo, done = pipeline["repo"], pipeline["killed_after"]
    out1, err1 = pipeline["first"]
    assert 1 <= done < 4, out1 + err1  # killed mid-run: after epoch 1, before the last
    assert "Running stage 'train'" in out1

    second = pipeline["second"].stdout
    assert f"train: resuming from phase 1 after epoch {done}" in second
    assert second.count("phase 1 epoch") == 3 - done  # no completed epoch trained twice
    assert second.count("phase 2 epoch") == 1
    metrics = json.loads((repo / C.PATHS.train_metrics).read_text())
    assert metrics["resumed"] == f"phase 1 after epoch {done}" and metrics["epochs"] == 4
    hist = (repo / C.PATHS.history).read_text().splitlines()
    assert [r.split(",")[:2] for r in hist[1:]] == [["1", "1"], ["2", "1"], ["3", "1"], ["4", "2"]]
    assert not list((repo / ".cache" / "train").glob("*"))  # the backup is gone once done

    summary = json.loads(pipeline["third"].stdout[pipeline["third"].stdout.index("{") :])
    assert (summary["evaluate"], summary["register"]) == ("ran", "ran")
    assert summary["download"] == "skipped"  # it checked the source: unchanged, data/raw kept
    assert {summary[s] for s in ("validate", "split", "augment", "train")} == {"skipped"}

    # complete and consistent: DVC sees nothing to do, and every hash in dvc.lock matches
    status = _run(repo, pipeline["env"], str(BIN / "dvc"), "status").stdout
    assert nothing_stale(status), status
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    from genderclf.tracking.setup import file_md5

    for stage in ("train", "evaluate"):
        for out in lock["stages"][stage]["outs"]:
            path = repo / out["path"]
            if path.is_file():
                assert file_md5(path) == out["md5"], out["path"]
    from genderclf.model.saving import load_model

    load_model(repo / C.PATHS.model)  # a whole, loadable model
    report = json.loads((repo / C.PATHS.register_report).read_text())
    run_id = json.loads((repo / C.PATHS.run).read_text())["run_id"]
    assert report["run_id"] == run_id and report["decision"] == "promoted"


def _prefect_log_messages(home: Path) -> list[str]:
    dbs = list(home.rglob("*.db"))
    assert dbs, f"no Prefect database under {home}"
    messages: list[str] = []
    for db in dbs:
        with sqlite3.connect(db) as con:
            tables = {r[0] for r in con.execute("select name from sqlite_master")}
            if "log" in tables:
                messages += [r[0] for r in con.execute("select message from log")]
    return messages


def _files_with(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            hits += [f"{p} contains {n!r}" for n in needles if n in data]
    return hits


def test_no_secret_reaches_tracking_logs_or_outputs(pipeline):
    from mlflow import MlflowClient

    from genderclf.tracking.setup import EXPERIMENT

    repo, server = pipeline["repo"], pipeline["server"]
    secrets = list(CANARIES.values())
    # not vacuous: the stages really ran with the canaries in their environment
    for value in secrets:
        assert value.encode() in pipeline["train_env"]

    # stdout/stderr of every command
    out1, err1 = pipeline["first"]
    streams = [out1, err1] + [
        s for k in ("second", "third") for s in (pipeline[k].stdout, pipeline[k].stderr)
    ]
    assert not [v for v in secrets for s in streams if v in s]

    # Prefect: the flow's and every stage task's log lines
    messages = _prefect_log_messages(Path(pipeline["env"]["PREFECT_HOME"]))
    assert any("Running stage 'evaluate'" in m for m in messages)
    assert not [m for m in messages for v in secrets if v in m]
    assert not _files_with(Path(pipeline["env"]["PREFECT_HOME"]), [v.encode() for v in secrets])

    # MLflow: params and tags of every run, through the API, then every stored byte
    client = MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id])
    assert runs
    for run in runs:
        text = json.dumps({"params": run.data.params, "tags": run.data.tags})
        assert not [v for v in secrets if v in text], run.info.run_id
    for mv in client.search_model_versions("name='gender-classifier'"):
        assert not [v for v in secrets if v in json.dumps(mv.tags)]
    needles = [v.encode() for v in secrets]
    assert not _files_with(server.root, needles)  # the store and all artifacts

    # the workspace's outputs (reports/, metrics/, plots/, models/, dvc.lock)
    for name in ("reports", "metrics", "plots", "models", "dvc.lock", ".dvc"):
        path = repo / name
        assert not (
            _files_with(path, needles)
            if path.is_dir()
            else [v for v in needles if v in path.read_bytes()]
        ), name
