"""Start the `train.processes` processes of a distributed training, and wait for them.

`genderclf train` (the DVC stage's command, which the Prefect `train` flow runs on the
`gpu` pool) calls `run` when `train.processes` > 1 and it is not itself one of the
processes. Where they run is infrastructure, chosen by where the command runs, never a
param (the same processes, the same outputs):

* `RAY_ADDRESS` set: on that Ray cluster, one actor per process (plain actors, not Ray
  Train: see `RayLauncher`), each reserving `GENDERCLF_RAY_CPUS_PER_PROCESS` CPUs and
  `GENDERCLF_RAY_GPUS_PER_PROCESS` GPUs (1 and 0 by default) in one placement group;
* otherwise: N processes on this host, the coordinator on 127.0.0.1.

On Kubernetes without Ray, an indexed Job starts every process itself
(`deploy/kubernetes/train-job.yaml`): each pod runs `genderclf train` as one process and
nothing is launched. Each process runs the stage's command, `python -m genderclf.pipeline
train`, with Keras' distribution variables (`genderclf.model.distributed`); process 0
writes the outputs.

If a process dies (killed, out of memory, a failed host), the others stop within
`distributed.HEARTBEAT_TIMEOUT_S` instead of hanging in an all-reduce; `run` stops what
is left and fails with one line. Running the stage again resumes from the last completed
epoch in the backup folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genderclf.config import Paths, Settings
from genderclf.model import distributed as D

log = logging.getLogger(__name__)

ENV_RAY_CPUS = "GENDERCLF_RAY_CPUS_PER_PROCESS"
ENV_RAY_GPUS = "GENDERCLF_RAY_GPUS_PER_PROCESS"
# Variables a Ray worker's process gets from the driver (tracking, storage, Keras/JAX
# settings); the rest of its environment is the Ray node's own.
FORWARDED = ("MLFLOW_", "AWS_", "KERAS_", "GENDERCLF_", "TF_", "XLA_", "JAX_", "PREFECT_")
STOP_GRACE_S = 5.0


@dataclass
class LaunchReport:
    """What the launching process returns: the chief's metrics/train.json."""

    metrics: dict[str, Any]
    engine: str


def engine() -> str:
    """`ray` when RAY_ADDRESS names a cluster, else `local` (N processes on this host)."""
    return "ray" if os.environ.get("RAY_ADDRESS") else "local"


def rank_command(params: Path) -> list[str]:
    """The command every process runs: the stage's own command, as this interpreter."""
    return [sys.executable, "-m", "genderclf.pipeline", "train", "--params", str(params)]


def rank_env(
    cluster: D.Cluster, backups: Path, base: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment of one process: `base` plus its place, the JAX backend and the
    shared backup root."""
    env = dict(os.environ if base is None else base)
    env.update(
        {
            "KERAS_BACKEND": "jax",
            D.ENV_ADDRESSES: cluster.coordinator,
            D.ENV_PROCESSES: str(cluster.processes),
            D.ENV_PROCESS_ID: str(cluster.process_id),
            D.ENV_BACKUPS: str(backups),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (the coordinator binds it a moment later)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    # Linux: the child gets SIGKILL when the launching process dies (killed, OOM), so no
    # process trains on alone.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _how(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def failure(rank: int, n: int, how: str, backup: Path, logs: str = "") -> D.DistributedError:
    """The one line a failed distributed training ends with."""
    where = f"; logs: {logs}" if logs else ""
    return D.DistributedError(
        f"training process {rank} of {n} {how}, so the training stopped (the others were "
        f"stopped too). Completed epochs are kept in {backup}: run `genderclf train` (or "
        f"`dvc repro train`) again to resume on {n} processes{where}"
    )


def run(settings: Settings, paths: Paths, params: Path, backup: Path) -> LaunchReport:
    """Start `train.processes` processes where this command runs; wait for all of them.

    Args:
        params: the params file every process reads (the one this command read).
        backup: this training's backup folder (`stages.train.prepare`); it is kept when a
            process fails, so the next run resumes.

    Returns:
        LaunchReport with the metrics process 0 wrote to `paths.train_metrics`.

    Raises:
        DistributedError: a process failed (one line: which, how, how to resume), or the
            Ray cluster has no room for the processes.
    """
    n = settings.train.processes
    name = engine()
    print(
        f"train: {n} processes on the JAX backend (Keras DataParallel), launched "
        + ("on the Ray cluster at " + os.environ["RAY_ADDRESS"] if name == "ray" else "here"),
        flush=True,
    )
    params, backups = Path(params).resolve(), backup.parent.resolve()
    if name == "ray":
        RayLauncher(n, backup).run(params, backups, paths)
    else:
        LocalLauncher(n, backup).run(params, backups)
    metrics = json.loads(Path(paths.train_metrics).read_text())
    return LaunchReport(metrics, name)


def spawn(argv: list[str], env: dict[str, str], log: Path, chief: bool, cwd: str | None = None):
    """Start one training process: process 0's console lines (the epochs) go to this
    console; everything else (logging, the other processes, a crash's stack dump) to `log`,
    so a failure ends with one readable line."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdout=None if chief else out,
            stderr=out,
            preexec_fn=_die_with_parent,
        )


def error_line(log: Path) -> str:
    """The stage's own error line in a process's log (`error (train): ...`), if any."""
    with contextlib.suppress(OSError):
        lines = log.read_text(errors="replace").splitlines()
        found = [x for x in lines if x.startswith("error (train): ")]
        if found:
            return ": " + found[-1].removeprefix("error (train): ")
    return ""


class LocalLauncher:
    """N processes on this host, their logs in `<backup>/logs/process-<i>.log`."""

    def __init__(self, processes: int, backup: Path):
        self.n, self.backup = processes, backup

    def run(self, params: Path, backups: Path) -> None:
        coordinator = f"127.0.0.1:{free_port()}"
        logs = self.backup / "logs"
        procs: list[subprocess.Popen] = []
        try:
            for rank in range(self.n):
                env = rank_env(D.Cluster(self.n, rank, coordinator), backups)
                procs.append(
                    spawn(rank_command(params), env, logs / f"process-{rank}.log", rank == 0)
                )
            self._wait(procs, logs)
        finally:
            stop(procs)

    def _wait(self, procs: list[subprocess.Popen], logs: Path) -> None:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                # The cause: a process killed by a signal (OOM, a lost host) before one that
                # exited with an error, then the lowest rank. The others abort after it: at
                # once when the all-reduce's socket closes (gloo), else on the heartbeat, so
                # by this poll the cause and the aborted may both be gone.
                rank, code = min(failed, key=lambda f: (f[1] >= 0, f[0]))
                log = logs / f"process-{rank}.log"
                how = _how(code) + error_line(log)
                raise failure(rank, self.n, how, self.backup, str(log))
            if all(c == 0 for c in codes):
                return
            time.sleep(0.5)


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every process still running, then SIGKILL what is left after a grace."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        if p.poll() is None:
            p.kill()
            p.wait()


class RayLauncher:
    """One Ray actor per process, all in one placement group (packed onto as few nodes as
    fit, so the all-reduce crosses as few links as it can).

    Plain actors, not Ray Train: Ray Train's `JaxTrainer` (2.60) joins JAX processes only
    for TPUs and GPUs (on CPU it skips `jax.distributed.initialize`, so it cannot be run
    or tested here), sets no heartbeat timeout or bind address, and runs the training
    inside its worker process, whose backend state (XLA flags, op determinism, Keras'
    global distribution) outlives one training. Its `TensorflowTrainer` sets TF_CONFIG for
    `MultiWorkerMirroredStrategy`, which Keras 3 cannot fit with. Each actor here runs the
    stage's own command in a child process, exactly as the local launcher does.

    Every node must see the working directory (the checkout with `data/prepared`) at the
    same path, and the backup root (`GENDERCLF_TRAIN_BACKUPS`) on a share; process 0's
    outputs are sent back to this node when it ran elsewhere.
    """

    def __init__(self, processes: int, backup: Path):
        self.n, self.backup = processes, backup

    def run(self, params: Path, backups: Path, paths: Paths) -> None:
        from genderclf import engine

        # one line naming the address when no head answers (Ray itself retries for a minute)
        engine.check_reachable(os.environ["RAY_ADDRESS"])
        ray = engine.import_ray()  # without Ray's `uv run` hook (see there)
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cpus = float(os.environ.get(ENV_RAY_CPUS, "1"))
        gpus = float(os.environ.get(ENV_RAY_GPUS, "0"))
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        here = ray.get_runtime_context().get_node_id()
        pg = placement_group([{"CPU": cpus, "GPU": gpus} if gpus else {"CPU": cpus}] * self.n)
        actors: list[Any] = []
        try:
            if not pg.wait(timeout_seconds=120):
                raise D.DistributedError(
                    f"the Ray cluster at {os.environ['RAY_ADDRESS']} has no room for "
                    f"train.processes={self.n} processes of {cpus:g} CPUs and {gpus:g} GPUs "
                    f"each ({ENV_RAY_CPUS}, {ENV_RAY_GPUS}): add nodes or lower them"
                )
            Rank = ray.remote(_RankActor)
            actors = [
                Rank.options(
                    num_cpus=cpus,
                    num_gpus=gpus,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=pg, placement_group_bundle_index=rank
                    ),
                ).remote()
                for rank in range(self.n)
            ]
            coordinator = ray.get(actors[0].coordinator_address.remote())
            forwarded = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED)}
            outputs = [
                str(p)
                for p in (
                    paths.model,
                    paths.model_info,
                    paths.run,
                    paths.train_metrics,
                    paths.history,
                    paths.curves,
                )
            ]
            logs = (self.backup / "logs").resolve()
            pending = {
                a.train.remote(
                    rank_command(params),
                    rank_env(D.Cluster(self.n, rank, coordinator), backups, forwarded),
                    str(Path.cwd()),
                    str(logs / f"process-{rank}.log"),
                    outputs if rank == 0 else [],
                    here,
                ): rank
                for rank, a in enumerate(actors)
            }
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                rank = pending.pop(done[0])
                try:
                    code, files = ray.get(done[0])
                except ray.exceptions.RayActorError as err:
                    how = f"lost its Ray actor ({type(err).__name__})"
                    raise failure(rank, self.n, how, self.backup) from None
                if code != 0:
                    log = logs / f"process-{rank}.log"  # on the share, or on that node
                    how = _how(code) + error_line(log)
                    raise failure(rank, self.n, how, self.backup, str(log))
                _write_back(files)
        finally:
            for a in actors:
                with contextlib.suppress(Exception):
                    ray.kill(a)
            with contextlib.suppress(Exception):
                remove_placement_group(pg)
            ray.shutdown()


def _write_back(files: dict[str, bytes]) -> None:
    from genderclf.io import atomic_file

    for name, data in files.items():
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(Path(name)) as tmp:
            Path(tmp).write_bytes(data)


class _RankActor:
    """One training process on a Ray node (the class is made remote by `RayLauncher`)."""

    def coordinator_address(self) -> str:
        import ray

        host = ray.util.get_node_ip_address()
        return f"{host}:{free_port(host)}"

    def train(
        self,
        argv: list[str],
        env: dict[str, str],
        cwd: str,
        log: str,
        outputs: list[str],
        driver: str,
    ) -> tuple[int, dict[str, bytes]]:
        """Run the process; returns its exit code and, from process 0 on another node than
        the driver's, the output files' bytes."""
        import ray

        if not Path(cwd).is_dir():
            print(f"train: no working directory {cwd} on this Ray node", flush=True)
            return 2, {}
        chief = bool(outputs)
        code = spawn(argv, {**os.environ, **env}, Path(log), chief, cwd).wait()
        files: dict[str, bytes] = {}
        if code == 0 and outputs and ray.get_runtime_context().get_node_id() != driver:
            files = {p: (Path(cwd) / p).read_bytes() for p in outputs}
        return code, files
