"""A DVC remote on S3 (`dvc-s3`), for real, against a local S3-protocol server (moto).

The whole pipeline runs once with `dvc repro` in a temporary git repository (tiny params,
as tests/integration/test_full_pipeline.py), the repository's remote is pointed at a
bucket on the local server the way docs/scaling-out.md says, and then:

* `dvc push` uploads every cached output of every stage (checked in the bucket with boto3);
* the local cache and every cached output are deleted;
* `dvc pull` brings them back byte for byte, and `dvc status` reports nothing changed.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from tests.helpers import BIN
from tests.helpers.servers import s3_client, s3_env
from tests.helpers.servers import s3_server as s3_server_at
from tests.helpers.workspace import copy_pipeline, git_commit, nothing_stale, pipeline_env, run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BUCKET = "genderclf-dvc"
PREFIX = "dvcstore"


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    """A real S3-protocol server (moto) on loopback, with the DVC bucket; its endpoint."""
    with s3_server_at(BUCKET) as endpoint:
        yield endpoint


def _env(repo: Path) -> dict[str, str]:
    """No MLflow or AWS settings from the machine; the S3 credentials DVC reads from env."""
    return pipeline_env(
        repo,
        drop=("MLFLOW_", "AWS_"),
        **s3_env(),
        AWS_CONFIG_FILE=str(repo.parent / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(repo.parent / "no-aws-credentials"),
    )


def _run(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run(repo, *args, env=_env(repo))


def _dvc(repo: Path, *args: str) -> str:
    proc = _run(repo, str(BIN / "dvc"), *args)
    return proc.stdout + proc.stderr


def _cached_outs(repo: Path) -> list[str]:
    """Every output of dvc.yaml that DVC caches (and so pushes); `cache: false` ones live in git."""
    outs = []
    for stage in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].values():
        for out in stage.get("outs", []):
            if isinstance(out, str):
                outs.append(out)
            else:
                ((path, opts),) = out.items()
                if (opts or {}).get("cache", True):
                    outs.append(path)
    return outs


def _digest(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (or of `path` itself), by relative name."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {
        p.relative_to(path.parent).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in files
    }


@pytest.fixture(scope="module")
def repo(tmp_path_factory, pipeline_params, s3_server) -> Path:
    """A git repo with the pipeline after a full `dvc repro`, its default remote on S3."""
    repo = tmp_path_factory.mktemp("dvc-s3") / "repo"
    copy_pipeline(repo)
    (repo / "params.yaml").write_text(yaml.safe_dump(pipeline_params, sort_keys=False))
    _run(repo, "git", "init", "-q")
    # The remote as docs/scaling-out.md sets it up: the bucket in .dvc/config, the
    # endpoint of an S3-compatible store next to it, the credentials from the environment.
    _dvc(repo, "remote", "add", "--default", "--force", "s3", f"s3://{BUCKET}/{PREFIX}")
    _dvc(repo, "remote", "modify", "s3", "endpointurl", s3_server)
    _dvc(repo, "repro")
    git_commit(repo, "pipeline run", env=_env(repo))
    return repo


def test_push_delete_pull_restores_every_output(repo, s3_server):
    outs = _cached_outs(repo)
    assert {"data/raw", "data/prepared", "models/model.keras"} <= set(outs)
    before = {out: _digest(repo / out) for out in outs}
    assert all(before.values()), before

    pushed = _dvc(repo, "push")
    assert "pushed" in pushed, pushed
    assert "in sync" in _dvc(repo, "status", "--cloud"), "cache and remote differ after push"
    client = s3_client(s3_server)
    keys = [
        o["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=f"{PREFIX}/"
        )
        for o in page.get("Contents", [])
    ]
    # DVC 3 content-addresses files as <prefix>/files/md5/<2 hex>/<rest>
    assert keys and all(k.startswith(f"{PREFIX}/files/md5/") for k in keys), keys[:5]
    n_files = sum(len(d) for d in before.values())
    assert len(keys) >= n_files - 1  # identical files (if any) are stored once

    # Lose the cache and every cached output, as on a fresh machine.
    shutil.rmtree(repo / ".dvc" / "cache")
    for out in outs:
        target = repo / out
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
    missing = _dvc(repo, "status")
    assert "deleted" in missing, missing

    _dvc(repo, "pull")
    assert {out: _digest(repo / out) for out in outs} == before
    status = _dvc(repo, "status")
    assert nothing_stale(status), status
    dry = _dvc(repo, "repro", "--dry")
    # only download would run (always: it lists the source; unchanged, it keeps data/raw)
    assert set(re.findall(r"Running stage '([\w-]+)'", dry)) == {"download"}, dry
