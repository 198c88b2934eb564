"""Helpers the tests share (the one copy of each): paths, tiny params, images, archives,
pipeline workspaces. Fixtures stay in the conftest.py files; nothing imports those.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv: dvc, genderclf, prefect, mlflow


def load_pyfunc(uri: str, dst: Path):
    """`mlflow.pyfunc.load_model(uri)` in this process, downloaded into `dst` (MLflow would
    otherwise leave a copy in a new temporary folder), leaving `sys.path` as it was.

    A model logged with `code_paths` puts its copy of the code first on `sys.path` for good
    (MLflow's `_add_code_to_system_path`). In this process `genderclf` is imported already,
    so its modules still come from its own package, but a process spawned later (which gets
    this `sys.path`) imported the model's copy, the code of the commit that logged the model:
    two test modules later, a Ray driver shipped that copy to the cluster.
    """
    import mlflow

    dst.mkdir(parents=True, exist_ok=True)
    path = list(sys.path)
    try:
        return mlflow.pyfunc.load_model(uri, dst_path=str(dst))
    finally:
        sys.path[:] = path


def uv_run() -> list[str]:
    """`uv run --frozen --no-sync`, as the README's commands run (the tests' uv: on PATH, or
    the one `make` started them with, found among this process's ancestors)."""
    import psutil

    uv = shutil.which("uv")
    if uv is None:
        for parent in psutil.Process().parents():
            try:
                cmd = parent.cmdline()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if cmd and os.path.basename(cmd[0]) == "uv" and os.path.isfile(cmd[0]):
                uv = cmd[0]
                break
    if uv is None:
        raise AssertionError("no uv on PATH nor among this process's ancestors: make setup")
    return [uv, "run", "--frozen", "--no-sync"]
