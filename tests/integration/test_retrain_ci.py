"""The retraining workflow's steps (`.ci/retrain`, what retrain.yml runs), end to end.

Everything is real but GitHub: git repositories with a bare `origin` whose `main` the
summary diffs against, a DVC remote on a real S3-protocol server (moto) on loopback, a
real `mlflow server`, and the job summary written to the file GITHUB_STEP_SUMMARY names.
Each job runs in a fresh clone, as on a runner; the train job gets the prepare job's
dvc.lock and metrics/ the way the workflow's artifact hands them over.

Round 1 retrains from a `main` without results, and its branch is merged into main.
Round 2 changes `train.lr_head` on main and retrains: the data stages are kept (the
source is unchanged), the summary's table has main's metrics and the new ones, and the
decision is the one reports/register.json holds.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from tests.helpers import BIN, REPO_ROOT
from tests.helpers.servers import S3_SECRET, MlflowServer, free_port, s3_client, s3_env
from tests.helpers.servers import s3_server as s3_server_at
from tests.helpers.workspace import copy_pipeline, pipeline_env, run, write_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BUCKET = "genderclf-retrain"


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    with s3_server_at(BUCKET) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), free_port())
    server.start()
    yield server
    server.stop()


class Ci:
    """The runner side: clones of `origin`, the secrets in the environment, the steps."""

    def __init__(self, root: Path, s3: str, mlflow_uri: str):
        self.root, self.s3, self.mlflow_uri = root, s3, mlflow_uri
        self.origin = root / "origin.git"

    def env(self, repo: Path, run_id: str, **extra: str) -> dict[str, str]:
        return pipeline_env(
            repo,
            drop=("MLFLOW_", "AWS_", "GITHUB_", "DVC_REMOTE"),
            **s3_env(),
            AWS_CONFIG_FILE=str(self.root / "no-aws-config"),
            AWS_SHARED_CREDENTIALS_FILE=str(self.root / "no-aws-credentials"),
            DVC_REMOTE_URL=f"s3://{BUCKET}/dvcstore",
            DVC_REMOTE_ENDPOINT_URL=self.s3,
            MLFLOW_TRACKING_URI=self.mlflow_uri,
            GITHUB_RUN_ID=run_id,
            GITHUB_STEP_SUMMARY=str(self.root / f"summary-{run_id}.md"),
            **extra,
        )

    def clone(self, name: str) -> Path:
        dest = self.root / name
        run(self.root, "git", "clone", "-q", str(self.origin), str(dest), env=self.env(dest, "0"))
        return dest

    def step(self, repo: Path, run_id: str, name: str, **extra: str) -> str:
        proc = run(repo, "bash", ".ci/retrain", name, env=self.env(repo, run_id, **extra))
        return proc.stdout + proc.stderr

    def git(self, repo: Path, *args: str) -> str:
        return run(repo, "git", *args, env=self.env(repo, "0")).stdout

    def commit_and_push(self, repo: Path, message: str, ref: str = "main") -> None:
        self.git(repo, "add", "-A")
        self.git(
            repo,
            "-c",
            "user.name=dev",
            "-c",
            "user.email=dev@example.com",
            "commit",
            "-qm",
            message,
        )
        self.git(repo, "push", "-q", "origin", f"HEAD:{ref}")

    def workflow(self, run_id: str) -> tuple[Path, str, str]:
        """The two jobs of retrain.yml: prepare in one clone, train and the rest in another."""
        prepare = self.clone(f"prepare-{run_id}")
        prepared = self.step(prepare, run_id, "prepare")
        train = self.clone(f"train-{run_id}")
        shutil.copy2(prepare / "dvc.lock", train / "dvc.lock")  # the workflow's artifact
        shutil.copytree(prepare / "metrics", train / "metrics", dirs_exist_ok=True)
        trained = self.step(train, run_id, "train")
        self.step(train, run_id, "summary")
        self.step(train, run_id, "publish")
        return train, prepared, trained

    def summary(self, run_id: str) -> str:
        return (self.root / f"summary-{run_id}.md").read_text()


@pytest.fixture(scope="module")
def ci(tmp_path_factory, pipeline_params, s3_server, mlflow_server) -> Ci:
    """`origin` with a `main` that holds the pipeline (tiny params) and no results yet."""
    root = tmp_path_factory.mktemp("retrain-ci")
    ci = Ci(root, s3_server, mlflow_server.uri)
    seed = copy_pipeline(root / "seed")
    shutil.copy2(REPO_ROOT / ".dvc" / ".gitignore", seed / ".dvc" / ".gitignore")
    (seed / ".ci").mkdir()
    shutil.copy2(REPO_ROOT / ".ci" / "retrain", seed / ".ci" / "retrain")
    write_params(seed, pipeline_params)
    run(root, "git", "init", "-q", "--bare", "-b", "main", str(ci.origin), env=ci.env(seed, "0"))
    ci.git(seed, "init", "-q", "-b", "main")
    ci.git(seed, "remote", "add", "origin", str(ci.origin))
    ci.commit_and_push(seed, "the pipeline")
    return ci


def _remote_keys(endpoint: str) -> set[str]:
    client = s3_client(endpoint)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="dvcstore/")
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def _md5_key(md5: str) -> str:
    return f"dvcstore/files/md5/{md5[:2]}/{md5[2:]}"


def _lock_outs(repo: Path) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for s in lock["stages"].values() for o in s.get("outs", [])}


def _check_round(ci: Ci, repo: Path, run_id: str) -> dict:
    # every cached output is on the remote: DVC says so, and the bucket holds the objects
    status = run(repo, str(BIN / "dvc"), "status", "--cloud", env=ci.env(repo, run_id)).stdout
    assert "in sync" in status, status
    keys = _remote_keys(ci.s3)
    outs = _lock_outs(repo)
    for path in ("data/raw", "data/prepared", "models/model.keras", "models/model.json"):
        assert _md5_key(outs[path]) in keys, path  # (a folder: its .dir listing)
    # the branch for review, on origin, with this run's dvc.lock and metrics
    branch = f"retrain/{run_id}"
    assert branch in ci.git(repo, "ls-remote", "--heads", "origin")
    pushed = ci.git(repo, "show", f"origin/{branch}:dvc.lock")
    assert pushed == (repo / "dvc.lock").read_text()
    files = ci.git(repo, "show", "--name-only", "--format=", f"origin/{branch}").split()
    assert {"dvc.lock", "metrics/eval.json"} <= set(files)
    # the decision in the summary is the register stage's
    report = json.loads((repo / "reports" / "register.json").read_text())
    summary = ci.summary(run_id)
    assert f"## Retraining run {run_id}" in summary
    assert f"**{report['decision']}**: gender-classifier version {report['version']}" in summary
    for reason in report["reasons"]:
        assert f"- {reason}" in summary
    return report


def test_two_retraining_runs_through_the_workflow_steps(ci):
    # Round 1: nothing on main to compare with yet
    repo1, prepared, trained = ci.workflow("101")
    assert "Running stage 'augment'" in prepared
    assert "Running stage 'train'" in trained and "Running stage 'register'" in trained
    assert "Stage 'augment' didn't change" in trained  # the prepare job's work was reused
    report1 = _check_round(ci, repo1, "101")
    assert report1["version"] == "1"  # the decision (tiny data: any) is checked above
    # the reviewer merges the branch
    ci.git(repo1, "push", "-q", "origin", "retrain/101:main")

    # Round 2: a new learning rate on main; main now holds round 1's metrics
    dev = ci.clone("dev")
    params = yaml.safe_load((dev / "params.yaml").read_text())
    params["train"]["lr_head"] *= 2
    write_params(dev, params)
    ci.commit_and_push(dev, "lr_head x2")
    repo2, prepared, trained = ci.workflow("102")
    assert "files kept, unchanged" in prepared  # the source did not change
    for stage in ("validate", "split", "augment"):
        assert f"Stage '{stage}' didn't change" in prepared, prepared
    assert "Running stage 'train'" in trained
    report2 = _check_round(ci, repo2, "102")
    assert report2["version"] == "2"

    summary = ci.summary("102")
    table = summary.split("### Metrics against main", 1)[1].split("### Promotion decision")[0]
    assert "| Path" in table and "origin/main" in table and "workspace" in table, table
    main_eval = json.loads(ci.git(repo2, "show", "origin/main:metrics/eval.json"))
    new_eval = json.loads((repo2 / "metrics" / "eval.json").read_text())
    row = next(
        line for line in table.splitlines() if "metrics/eval.json" in line and "| accuracy " in line
    )
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[2]) == pytest.approx(main_eval["accuracy"], abs=1e-4), row
    assert float(cells[3]) == pytest.approx(new_eval["accuracy"], abs=1e-4), row


def test_missing_secrets_fail_with_an_error_annotation(ci):
    repo = ci.clone("no-secrets")
    env = ci.env(repo, "103")
    del env["DVC_REMOTE_URL"]
    proc = run(repo, "bash", ".ci/retrain", "prepare", env=env, check=False)
    assert proc.returncode == 1
    assert "::error::repository secret DVC_REMOTE_URL is not set" in proc.stderr
    env = ci.env(repo, "103")
    del env["MLFLOW_TRACKING_URI"]
    proc = run(repo, "bash", ".ci/retrain", "train", env=env, check=False)
    assert proc.returncode == 1
    assert "::error::repository secret MLFLOW_TRACKING_URI is not set" in proc.stderr
    assert S3_SECRET not in proc.stdout + proc.stderr
