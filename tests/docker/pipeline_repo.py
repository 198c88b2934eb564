"""The pipeline repository the containers run: the repo's DVC files and code with the
shrunk params.yaml the other pipeline tests use, committed in a git repository of its own."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tests.helpers import REPO_ROOT
from tests.helpers.params import pipeline_params as tiny_pipeline_params
from tests.helpers.workspace import copy_pipeline, write_params

STAGES = ("download", "validate", "split", "augment", "tune", "train", "evaluate", "register")
IMAGE_UID = 1000  # the `genderclf` user of both images


def pipeline_params(real: dict[str, Any] | None = None) -> dict[str, Any]:
    """params.yaml shrunk as the other whole-pipeline tests shrink it
    (`tests.helpers.params.pipeline_params`: a small CNN at 32 px, one epoch per phase, a
    promotion floor of 0: one tiny epoch is no good model, and the tests need a champion)."""
    return tiny_pipeline_params()


def git(repo: Path, *args: str) -> str:
    proc = subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "GIT_CONFIG_GLOBAL": os.devnull},
    )
    assert proc.returncode == 0, f"git {args}: {proc.stderr}"
    return proc.stdout


def make_pipeline_repo(repo: Path, real_params: dict[str, Any]) -> Path:
    """dvc.yaml, src/, flows/, prefect.yaml and the shrunk params.yaml, committed in `repo`."""
    copy_pipeline(repo, ("src", "flows"))
    shutil.copy2(REPO_ROOT / "prefect.yaml", repo / "prefect.yaml")
    write_params(repo, pipeline_params(real_params))
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "pipeline with tiny params")
    return repo


def owned_by_image_user(path: Path) -> Path:
    """chown -R `path` to the images' uid/gid 1000, so the non-root container can write."""
    for p in (path, *path.rglob("*")):
        os.lchown(p, IMAGE_UID, IMAGE_UID)
    return path
