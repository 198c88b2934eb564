"""Helpers the tests share (the one copy of each): paths, tiny params, images, archives,
pipeline workspaces. Fixtures stay in the conftest.py files; nothing imports those.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv: dvc, genderclf, prefect, mlflow
