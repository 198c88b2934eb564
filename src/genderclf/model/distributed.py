"""Data-parallel training across processes and hosts: what one process of N does.

`train.processes: N` (N > 1) trains one model with N processes, on one host or several,
with Keras' distribution API on the JAX backend: `jax.distributed` joins the processes,
`keras.distribution.DataParallel` spreads every step's global batch (`train.batch_size`)
over every device of every process and all-reduces the gradients. Each process reads its
own TFRecord shards (`shard_plan`) and runs the same number of steps per epoch (the
remainder is dropped: a process with one step more would wait for the others forever).
Only the chief (process 0) writes the stage's outputs, the backup and the MLflow run.

TensorFlow's `MultiWorkerMirroredStrategy` is not used: Keras 3 (3.15) fails in `fit()`
before the first step (docs/model.md, "Distributed training").

A process learns its place from the environment, Keras' own variables
(`KERAS_DISTRIBUTION_JOB_ADDRESSES`, `..._NUM_PROCESSES`, `..._PROCESS_ID`), which the
launchers set (`genderclf.model.launch`); a Kubernetes indexed Job gives the process id as
`JOB_COMPLETION_INDEX`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genderclf.config import GenderclfError, TrainSettings
from genderclf.contracts import PreparedData

log = logging.getLogger(__name__)

ENV_ADDRESSES = "KERAS_DISTRIBUTION_JOB_ADDRESSES"  # host:port of process 0 (the coordinator)
ENV_PROCESSES = "KERAS_DISTRIBUTION_NUM_PROCESSES"
ENV_PROCESS_ID = "KERAS_DISTRIBUTION_PROCESS_ID"
ENV_K8S_INDEX = "JOB_COMPLETION_INDEX"  # set by Kubernetes in each pod of an indexed Job
# Where the coordinator listens (host:port); default: the coordinator address itself, so a
# local run listens on 127.0.0.1 only. A pod sets its own IP (docs/scaling-out.md).
ENV_BIND = "GENDERCLF_COORDINATOR_BIND"
# The backup root (the resumable checkpoints) when it must be on a share every host reads.
ENV_BACKUPS = "GENDERCLF_TRAIN_BACKUPS"

# How long a process waits for the others to join, and after how long without a heartbeat
# a process counts as dead: the survivors then stop (JAX aborts them) instead of hanging
# in an all-reduce.
JOIN_TIMEOUT_S = 300
HEARTBEAT_TIMEOUT_S = 10
# At exit the processes wait for each other (JAX's shutdown barrier) while the chief saves
# the model and logs it to MLflow (an upload that may take minutes); a dead process is
# still caught by the heartbeat.
SHUTDOWN_TIMEOUT_S = 3600


class DistributedError(GenderclfError):
    """Distributed training cannot start or did not finish; the message says what to do."""


@dataclass(frozen=True)
class Cluster:
    """This process's place: `process_id` of `processes`, joined at `coordinator`."""

    processes: int = 1
    process_id: int = 0
    coordinator: str = ""

    @property
    def is_chief(self) -> bool:
        return self.process_id == 0

    @property
    def distributed(self) -> bool:
        return self.processes > 1


_current = Cluster()


def current() -> Cluster:
    """The cluster this process joined (`initialize`), or a one-process one."""
    return _current


def is_chief() -> bool:
    """True in a one-process run and in process 0 of a distributed one."""
    return _current.is_chief


def from_env(environ: dict[str, str] | None = None) -> Cluster | None:
    """This process's place from the launcher's environment, or None outside a launch.

    Raises:
        DistributedError: the variables are incomplete or out of range.
    """
    env = os.environ if environ is None else environ
    if ENV_PROCESSES not in env:
        return None
    raw_id = env.get(ENV_PROCESS_ID, env.get(ENV_K8S_INDEX))
    address = env.get(ENV_ADDRESSES, "").split(",")[0].strip()
    try:
        n, rank = int(env[ENV_PROCESSES]), int(raw_id if raw_id is not None else "")
    except ValueError:
        raise DistributedError(
            f"{ENV_PROCESSES}={env[ENV_PROCESSES]!r} needs an integer process count and "
            f"{ENV_PROCESS_ID} (or {ENV_K8S_INDEX}) an integer process id; got "
            f"{raw_id!r}"
        ) from None
    if not 0 <= rank < n or not address:
        raise DistributedError(
            f"distributed training needs 0 <= {ENV_PROCESS_ID} < {ENV_PROCESSES} and "
            f"{ENV_ADDRESSES}=host:port of process 0; got id {rank} of {n}, address "
            f"{address!r}"
        )
    return Cluster(n, rank, address)


def check(train: TrainSettings, cluster: Cluster | None, backend: str | None = None) -> None:
    """Fail early, with the key to change, when N processes cannot train.

    `backend` is the Keras backend in use (in a training process); before one is started
    it is what KERAS_BACKEND asks for, JAX when unset (the launcher sets it).

    Raises:
        DistributedError: the backend is not JAX or JAX is missing, or the launcher
            started another number of processes than `train.processes`.
    """
    if cluster is not None and cluster.processes != train.processes:
        raise DistributedError(
            f"train.processes={train.processes} but this process was started as one of "
            f"{cluster.processes} ({ENV_PROCESSES}): start as many processes as "
            "train.processes says"
        )
    if train.processes == 1:
        return
    backend = backend or os.environ.get("KERAS_BACKEND") or "jax"
    if backend != "jax":
        raise DistributedError(
            f"train.processes={train.processes} trains on Keras' JAX backend, but "
            f"KERAS_BACKEND={backend}: unset it (the launcher picks jax) or set it to jax; "
            "TensorFlow's MultiWorkerMirroredStrategy does not work with Keras 3 "
            "(docs/model.md)"
        )
    if importlib.util.find_spec("jax") is None:
        raise DistributedError(
            f"train.processes={train.processes} trains on Keras' JAX backend, which is not "
            "installed: `uv sync --frozen --extra jax` (CPU), or add `jax[cuda12]` on a GPU "
            "host (docs/model.md)"
        )


def initialize(cluster: Cluster) -> None:
    """Join the other processes and make every step data-parallel over all their devices.

    Call once, before the backend first lists its devices. Keras'
    `keras.distribution.initialize` is this call without timeouts or a bind address; the
    coordinator listens on `GENDERCLF_COORDINATOR_BIND` or else on its own address (so a
    local run stays on 127.0.0.1).

    Raises:
        DistributedError: the other processes did not join within JOIN_TIMEOUT_S.
    """
    global _current
    if not cluster.distributed:
        _current = cluster
        return
    import jax
    import keras

    try:
        jax.distributed.initialize(
            coordinator_address=cluster.coordinator,
            num_processes=cluster.processes,
            process_id=cluster.process_id,
            coordinator_bind_address=os.environ.get(ENV_BIND) or cluster.coordinator,
            initialization_timeout=JOIN_TIMEOUT_S,
            heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
            shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S,
        )
    except Exception as err:  # jaxlib raises XlaRuntimeError (a RuntimeError) or ValueError
        raise DistributedError(
            f"process {cluster.process_id} of {cluster.processes} could not join the "
            f"coordinator at {cluster.coordinator} within {JOIN_TIMEOUT_S}s: "
            f"{str(err).splitlines()[0][:300]}"
        ) from None
    # The data is split by us (each process its own shards, `shard_plan`); Keras' own
    # auto-sharding would read every record in every process and keep every N-th batch.
    keras.distribution.set_distribution(keras.distribution.DataParallel(auto_shard_dataset=False))
    _current = cluster
    log.info(
        "process %d of %d joined %s: %d devices in all, %d here",
        cluster.process_id,
        cluster.processes,
        cluster.coordinator,
        jax.device_count(),
        jax.local_device_count(),
    )


def local_model(model: Any) -> Any:
    """The chief's copy of the trained `model` on its own devices, outside the distribution.

    In a distributed run, making or assigning a variable is a collective (JAX's
    `device_put` checks the value is the same in every process), so a save, a load or a
    prediction that only the chief makes would wait for the others for ever. The copy is
    made from the weights (reading them is local), compiled from the same compile config
    (the optimizer's state is not carried over: nothing after training needs it). In a
    one-process run, `model` itself.
    """
    if not _current.distributed:
        return model
    import keras

    weights = model.get_weights()
    keras.distribution.set_distribution(None)
    local = keras.models.clone_model(model)
    local.set_weights(weights)
    config = model.get_compile_config()
    if config:
        local.compile_from_config(config)
    return local


@contextlib.contextmanager
def exit_on_error():
    """In a process of a distributed training: any error ends the process at once.

    Python's normal exit runs JAX's shutdown, which waits for the other processes; if
    they are inside a collective waiting for this one (an error in the chief's own work:
    a full disk, a broken pipe), both would wait until the shutdown timeout. `os._exit`
    skips it: the others see the heartbeat stop and abort within HEARTBEAT_TIMEOUT_S, and
    the launcher reports this process's error line.
    """
    try:
        yield
    except BaseException as err:
        if isinstance(err, SystemExit) and not err.code:
            raise
        if isinstance(err, GenderclfError):
            message = str(err)
        else:
            traceback.print_exc()
            message = f"{type(err).__name__}: {err}"
        with contextlib.suppress(Exception):
            print(f"error (train): {message}", file=sys.stderr, flush=True)
        os._exit(1)


def shard_records(data: PreparedData, split: str) -> list[int]:
    """Records in each shard of a split: `augment.shard_size` each, the last one the rest."""
    info = data.split(split)
    size = int(data.augment["shard_size"])
    return [max(0, min(size, info.records - i * size)) for i in range(len(info.shards))]


@dataclass(frozen=True)
class ShardPlan:
    """What process `process_id` of `processes` reads of the train split, and for how long."""

    shards: list[str]  # file names, every `processes`-th shard from `process_id`
    records: int  # records in those shards
    batch: int  # images per step in this process (global batch / processes)
    steps: int  # steps per epoch: the same in every process

    @property
    def records_per_epoch(self) -> int:
        """Records this process trains on in one epoch (its remainder dropped)."""
        return self.steps * self.batch


def shard_plan(data: PreparedData, split: str, cluster: Cluster, global_batch: int) -> ShardPlan:
    """Shards `process_id` reads and the steps per epoch every process can run.

    Shard i goes to process i mod N. Every process runs the steps the smallest share fills
    with full batches, so the all-reduce never waits for a process that has run out.

    Raises:
        DistributedError: fewer shards than processes (some process would have none).
    """
    names = list(data.split(split).shards)
    counts = shard_records(data, split)
    n = cluster.processes
    if len(names) < n:
        raise DistributedError(
            f"data/prepared has {len(names)} {split} shard(s) for train.processes={n}: each "
            "process reads its own shards; lower augment.shard_size (now "
            f"{data.augment['shard_size']}) and run `dvc repro augment`, or lower "
            "train.processes"
        )
    batch = global_batch // n
    shares = [sum(counts[r::n]) for r in range(n)]
    steps = min(shares) // batch
    if steps == 0:
        raise DistributedError(
            f"process shares of {min(shares)} {split} records cannot fill one batch of "
            f"{batch} (train.batch_size={global_batch} over {n} processes): lower "
            "train.batch_size or train.processes"
        )
    r = cluster.process_id
    return ShardPlan(names[r::n], shares[r], batch, steps)


def backup_root(default: Path) -> Path:
    """The backup root: `GENDERCLF_TRAIN_BACKUPS` (a share every host reads) or `default`."""
    return Path(os.environ.get(ENV_BACKUPS) or default)
