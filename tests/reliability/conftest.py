"""Fixtures for the reliability tests: the model-stage fixtures, a real MLflow server, a
real small file system.

The model-stage fixtures (tiny settings, the prepared sample, a per-test MLflow store)
live in tests/integration/conftest.py; importing them here makes them visible to this
folder without moving them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.integration.conftest import (  # noqa: F401  (fixtures, re-exported for this folder)
    MODEL_TINY,
    mlflow_store,
    model_settings,
    prepared,
    sample_data,
)

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MlflowServer:
    """A real `mlflow server` on loopback: SQLite backend, proxied artifacts, in `root`."""

    root: Path
    port: int
    proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "server.log", "ab")  # noqa: SIM115  (closed with the process)
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server",
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"mlflow server exited {self.proc.returncode}:\n"
                    + (self.root / "server.log").read_text()[-3000:]
                )
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r,
            ):
                if r.status == 200:
                    return
            time.sleep(0.3)
        self.stop()
        raise AssertionError(f"mlflow server did not answer /health within {timeout}s")

    def stop(self) -> None:
        """Stop the server and every worker it started (its own process group)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, 15)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
            self.proc.wait(10)
        self.proc = None


class Gate:
    """A TCP relay in front of the server: `down()` makes the server unreachable.

    While down, nothing listens on the gate's port and open connections are cut, so a
    client sees exactly what a dead server gives (connection refused / reset), without the
    minute a real `mlflow server` needs to start again on a busy 2-core machine.
    """

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.up()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            if self._listener is not None:
                with contextlib.suppress(OSError):
                    self._listener.shutdown(socket.SHUT_RDWR)
                self._listener.close()
                self._listener = None
            for c in self._conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
                c.close()
            self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    server.close()
                    return
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    """One real MLflow server for the session (starting one takes up to a minute)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), free_port())
    server.start()
    yield server
    server.stop()


def delete_registered_model() -> None:
    """Start from an empty registry: version numbers begin at 1 again."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from genderclf.tracking.setup import MODEL_NAME

    with contextlib.suppress(MlflowException):
        MlflowClient().delete_registered_model(MODEL_NAME)


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
