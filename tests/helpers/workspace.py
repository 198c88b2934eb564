"""Pipeline workspaces: a copy of the repo's DVC files and sources in a git repo of its own.

Tests that run `dvc repro`, the flows or workers work in such a copy, so they never touch
this checkout's `data/`, `dvc.lock` or MLflow store.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from tests.helpers import BIN, REPO_ROOT


def copy_pipeline(dest: Path, folders: tuple[str, ...] = ("src",)) -> Path:
    """Copy dvc.yaml, .dvcignore, .gitignore, .dvc/config and `folders` into `dest`.

    Returns `dest` (created if missing); params.yaml and `git init` are the caller's.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy2(REPO_ROOT / name, dest / name)
    (dest / ".dvc").mkdir()
    shutil.copy2(REPO_ROOT / ".dvc" / "config", dest / ".dvc" / "config")
    for folder in folders:
        shutil.copytree(
            REPO_ROOT / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    return dest


def write_params(repo: Path, params: dict[str, Any]) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def pipeline_env(repo: Path, drop: tuple[str, ...] = ("MLFLOW_",), **extra: str) -> dict[str, str]:
    """The environment for processes in `repo`: this venv first on PATH, the copy's sources
    on PYTHONPATH (what DVC hashes, not the editable install), no analytics, no user git
    config, and no variable starting with one of `drop` from this machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(
        {
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(repo / "src"),
            "DVC_NO_ANALYTICS": "1",
            "DVC_SITE_CACHE_DIR": str(repo.parent / "dvc-site-cache"),
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_CONFIG_NOSYSTEM": "1",
            **extra,
        }
    )
    return env


def run(
    repo: Path,
    *args: str,
    env: dict[str, str] | None = None,
    check: bool = True,
    cwd: Path | None = None,
    timeout: float = 540,
) -> subprocess.CompletedProcess[str]:
    """Run a command in `repo` (with `pipeline_env` unless `env` is given); on failure the
    assertion shows the tails of its output."""
    proc = subprocess.run(
        args,
        cwd=cwd or repo,
        env=env or pipeline_env(repo),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} exited {proc.returncode}\n--- stdout\n"
            f"{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def dvc(repo: Path, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return run(repo, str(BIN / "dvc"), *args, **kw)


def git_commit(repo: Path, message: str, **kw: Any) -> str:
    """`git add -A` and commit (a throw-away identity); returns the commit id."""
    run(repo, "git", "add", "-A", **kw)
    run(
        repo,
        "git",
        "-c",
        "user.name=test",
        "-c",
        "user.email=test@example.com",
        "commit",
        "-qm",
        message,
        **kw,
    )
    return run(repo, "git", "rev-parse", "HEAD", **kw).stdout.strip()


def git_init(repo: Path, **kw: Any) -> str:
    """A git repository of `repo`'s files, committed once."""
    run(repo, "git", "init", "-q", **kw)
    return git_commit(repo, "init", **kw)


# The download stage is `always_changed` (it lists the source and keeps an unchanged one's
# data), so `dvc status` always names it; "nothing to do" means nothing else is named.
ALWAYS_RUNS = frozenset({"download"})


def status_stages(status: str) -> set[str]:
    """The stages a `dvc status` output names (its `stage:` lines)."""
    import re

    return set(re.findall(r"^([\w.-]+):\s*$", status, re.M))


def nothing_stale(status: str) -> bool:
    """`dvc status` reports nothing but the always-changed download stage."""
    if "Data and pipelines are up to date" in status:
        return True
    return status_stages(status) <= ALWAYS_RUNS and "always changed" in status
