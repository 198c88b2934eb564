"""The one way tests lay out a pipeline workspace: the repo's DVC files and sources, copied.

Tests that run `dvc repro`, the flows or workers need a git repository of their own, so
they never touch this checkout's `data/`, `dvc.lock` or MLflow store.
"""

from __future__ import annotations

import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


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
        shutil.copytree(REPO_ROOT / folder, dest / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))  # fmt: skip
    return dest
