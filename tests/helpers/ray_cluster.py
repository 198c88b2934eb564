"""A real Ray cluster on loopback for tests: a head and a second node, separate processes.

Both nodes run `ray start --block` from this venv, each in a process group of its own (so
a node and every process it starts are stopped, or killed, by that group's id), with
`--node-ip-address 127.0.0.1`, every port they open chosen free on 127.0.0.1, the
dashboard off, usage statistics off, and a short temp folder of their own (Ray's socket
paths must stay under 108 characters).

Loopback takes two settings, because Ray turns "127.0.0.1" into the machine's outward
address (`ray._private.services.resolve_ip_for_localhost`), meant for real clusters:

* the nodes start through `LAUNCHER`, which keeps the address as given;
* drivers (the `genderclf` commands under test) and the head's own processes get
  `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` in their environment (`RayCluster.driver_env()`):
  Ray's single-machine mode, in which the local address is 127.0.0.1.

API, for the tests of any issue that runs on the cluster:

    with ray_cluster(root, cpus=1, env=s3_env()) as cluster:   # or the `ray_cluster` fixture
        env = {**os.environ, **cluster.driver_env()}   # RAY_ADDRESS=127.0.0.1:<port>
        cluster.driver_env(client=True)  # RAY_ADDRESS=ray://127.0.0.1:<client port>
        cluster.kill_node()         # SIGKILL the second node's process group (a crash)
        cluster.restart_node()      # a fresh second node; waits until it has joined
        cluster.ensure_nodes()      # restart the second node if it was killed
        cluster.pids()              # every process of both nodes
        cluster.listening()         # [(local address, port, pid)] of their listening sockets
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.servers import free_port

LAUNCHER = (
    "import sys; import ray._private.services as s; "
    "s.resolve_ip_for_localhost = lambda host: host; "
    "from ray.scripts.scripts import main; sys.argv = ['ray', *sys.argv[1:]]; main()"
)
# Every Ray process of the cluster listens on these (IPv4, or IPv4 mapped into IPv6).
LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "[::ffff:127.0.0.1]")
STARTED = "Ray runtime started."


def _ports(n: int) -> list[int]:
    return [free_port() for _ in range(n)]


@dataclass
class RayCluster:
    """A head and a second node on 127.0.0.1 (see the module docstring for the API)."""

    root: Path
    cpus: int = 1
    env: dict[str, str] = field(default_factory=dict)
    object_store_mb: int = 256
    nodes: int = 2  # 1: the head alone (e.g. a benchmark on this machine's cores)
    port: int = 0
    client_port: int = 0  # Ray Client's server on the head: `ray://127.0.0.1:<client_port>`
    head: subprocess.Popen | None = None
    node: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def driver_env(self, client: bool = False) -> dict[str, str]:
        """What a driver process needs in its environment to use this cluster: the GCS
        address, or with `client` Ray Client's (`ray://`, a driver outside the cluster).
        Token authentication, when the nodes have it (`env`), goes along."""
        address = f"ray://127.0.0.1:{self.client_port}" if client else self.address
        auth = {k: v for k, v in self.env.items() if k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
        return {"RAY_ADDRESS": address, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **auth}

    def _start(
        self, name: str, args: list[str], timeout: float, extra: dict[str, str] | None = None
    ) -> subprocess.Popen:
        metrics, agent, agent_grpc, runtime_env, export = _ports(5)
        cmd = [
            sys.executable,
            "-c",
            LAUNCHER,
            "start",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            str(self.cpus),
            "--num-gpus",
            "0",
            "--object-store-memory",
            str(self.object_store_mb * 1024 * 1024),
            "--temp-dir",
            str(self.root / "tmp"),
            "--disable-usage-stats",
            "--dashboard-agent-listen-port",
            str(agent),
            "--dashboard-agent-grpc-port",
            str(agent_grpc),
            "--runtime-env-agent-port",
            str(runtime_env),
            "--metrics-export-port",
            str(export),
            "--node-manager-port",
            str(free_port()),
            "--object-manager-port",
            str(free_port()),
            "--min-worker-port",
            "0",
            "--max-worker-port",
            "0",
            *args,
        ]
        env = {
            **os.environ,
            "RAY_USAGE_STATS_ENABLED": "0",
            # fixed by default (44217, 44227): two clusters on one machine would collide
            "AUTOSCALER_METRIC_PORT": str(metrics),
            "DASHBOARD_METRIC_PORT": str(free_port()),
            # Nodes as KubeRay starts them, not under `uv run` (pytest is, under make): else
            # Ray Client's server on the head applies Ray's `uv run` hook to each client's
            # job, with the head's folder as a working_dir it cannot upload
            # (genderclf.engine.import_ray turns the hook off for drivers).
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
            **self.env,
            **(extra or {}),
        }
        env.pop("RAY_ADDRESS", None)
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self._wait_started(proc, self.root / f"{name}.log", timeout)
        return proc

    @staticmethod
    def _wait_started(proc: subprocess.Popen, log: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = log.read_bytes().decode(errors="replace")
            if STARTED in text:
                return
            if proc.poll() is not None:
                raise AssertionError(f"ray start exited {proc.returncode}:\n{text[-4000:]}")
            time.sleep(0.5)
        raise AssertionError(f"ray start did not finish in {timeout}s:\n{log.read_text()[-4000:]}")

    def start(self, timeout: float = 180) -> None:
        """Start the head, then the second node; return when both have joined."""
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.client_port = free_port()
        self.head = self._start(
            "head",
            [
                "--head",
                "--port",
                str(self.port),
                "--include-dashboard",
                "false",
                "--ray-client-server-port",
                str(self.client_port),
            ],
            timeout,
            # The processes the head starts itself (Ray Client's server for each client)
            # take 127.0.0.1 literally this way; the second node cannot (Ray refuses to
            # join a cluster in this mode), hence LAUNCHER.
            {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
        )
        if self.nodes > 1:
            self.restart_node(timeout)

    def restart_node(self, timeout: float = 180) -> None:
        """A fresh second node (after `kill_node`); returns when it has joined."""
        self._stop_group(self.node, kill=True)
        self.node = self._start("node", ["--address", self.address], timeout)

    def ensure_nodes(self) -> None:
        """Both nodes running (the second is restarted if a test killed it)."""
        if self.head is None or self.head.poll() is not None:
            raise AssertionError("the Ray head is not running")
        if self.nodes < 2:
            return
        if self.node is None or self.node.poll() is not None or not self._group_alive(self.node):
            self.restart_node()

    def kill_node(self) -> None:
        """Kill the second node's processes at once (SIGKILL to its process group)."""
        self._stop_group(self.node, kill=True)

    @staticmethod
    def _group_alive(proc: subprocess.Popen) -> bool:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    @staticmethod
    def _group_pids(proc: subprocess.Popen | None) -> list[int]:
        if proc is None:
            return []
        out = subprocess.run(
            ["ps", "-o", "pid=", "-g", str(proc.pid)], capture_output=True, text=True
        ).stdout
        return [int(p) for p in out.split()]

    def pids(self) -> list[int]:
        """Every process of both nodes (their process groups)."""
        return self._group_pids(self.head) + self._group_pids(self.node)

    def listening(self) -> list[tuple[str, int, int]]:
        """(local address, port, pid) of every TCP socket the cluster's processes listen on."""
        pids = set(self.pids())
        out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
        found = []
        for line in out.splitlines():
            cols = line.split()
            if len(cols) < 6:
                continue
            local = cols[3]
            host, _, port = local.rpartition(":")
            for part in cols[5].split("pid=")[1:]:
                pid = int(part.split(",")[0])
                if pid in pids:
                    found.append((host, int(port), pid))
        return found

    @classmethod
    def _stop_group(cls, proc: subprocess.Popen | None, kill: bool = False, wait: float = 30):
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and cls._group_alive(proc):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)

    def stop(self) -> None:
        """Stop both nodes (SIGTERM to each group, SIGKILL what is left) and remove `root`."""
        self._stop_group(self.node, wait=20)
        self._stop_group(self.head, wait=20)
        self.node = self.head = None


@contextlib.contextmanager
def ray_cluster(
    cpus: int = 1, env: dict[str, str] | None = None, object_store_mb: int = 256, nodes: int = 2
) -> Iterator[RayCluster]:
    """A started `RayCluster` (head + second node, or the head alone with `nodes=1`) in a
    short temp folder; stopped after."""
    root = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    cluster = RayCluster(root, cpus, dict(env or {}), object_store_mb, nodes)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
