"""Fixtures for the reliability tests: a real MLflow server behind a gate, and a real
small file system. (The model-stage fixtures are in tests/conftest.py.)
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.helpers.servers import Gate, MlflowServer, delete_registered_model, free_port


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    """One real MLflow server for the session (starting one takes up to a minute)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def use_server(mlflow_server, tmp_path, monkeypatch) -> Iterator[Gate]:
    """Point this process at the server through a fresh Gate, with an empty registry.

    The cwd is tmp_path (stage paths are relative). Returns the gate (`down()`/`up()`).
    """
    import mlflow

    gate = Gate(mlflow_server.port)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", gate.uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    # Fail fast while the gate is down: no long HTTP-level retries.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    mlflow.set_tracking_uri(gate.uri)
    delete_registered_model()
    yield gate
    gate.down()
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


# --- a real, small, mountable file system ----------------------------------------------------


def _mount(*args: str) -> bool:
    if shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@dataclass
class SmallFs:
    """A tmpfs of a fixed size mounted at `path`; `read_only()` remounts it read-only."""

    path: Path

    def read_only(self) -> None:
        assert _mount("-o", "remount,ro", str(self.path)), "remount read-only failed"


@pytest.fixture
def small_fs(tmp_path) -> Callable[[int], SmallFs]:
    """Factory: `small_fs(size_kb)` mounts a real tmpfs (needs root); skips where it cannot."""
    mounted: list[Path] = []

    def make(size_kb: int, name: str = "fs") -> SmallFs:
        path = tmp_path / name
        path.mkdir()
        if not _mount("-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)):
            pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)")
        mounted.append(path)
        return SmallFs(path)

    yield make
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
