"""Where per-item work runs past one machine: a Ray cluster, chosen by `RAY_ADDRESS` alone.

`genderclf.io.parallel_map` is the project's one parallel map. Without `RAY_ADDRESS` it
runs on this machine's process pool (the embedded default, and nothing here imports Ray).
With it, each chunk of items becomes one Ray task on that cluster, running the same
per-item function, and the results come back in input order, so the outputs are the same
bytes either way and switching engine re-runs no DVC stage (STYLE 19: the engine is
infrastructure, never a param).

What the cluster must give for identical bytes, and what this module does about it:

* Code: the driver ships its own `genderclf` package to the workers (Ray's `py_modules`),
  so the code that runs is the code DVC hashed, whatever version the nodes have installed.
  The libraries are the nodes' own: every node runs the same image (same Pillow and
  libjpeg, same NumPy), and the driver the same Ray and Python versions as the cluster
  (Ray refuses to connect otherwise; the error names both versions).
* Faults: a task whose worker or node dies runs again elsewhere (`TASK_RETRIES`, Ray's
  task retries); its result is the same because the per-item functions are pure (their
  randomness is seeded by the item).
* Credentials: nothing secret travels in task arguments or in the runtime environment
  (the dashboard shows both); workers take S3 credentials from their node's own
  environment or instance role.
* Progress: each task is named after its function and chunk (`validation._check [12]`)
  in Ray's dashboard; the driver's progress bar moves as chunks complete.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from genderclf.config import GenderclfError

log = logging.getLogger(__name__)

ADDRESS_VARIABLE = "RAY_ADDRESS"
UV_HOOK_VARIABLE = "RAY_ENABLE_UV_RUN_RUNTIME_ENV"  # see import_ray
# Runs of one task after the first when its worker process or node dies.
TASK_RETRIES = 5
# Chunks in flight per CPU of the cluster: enough to keep every worker busy while the
# driver consumes results, few enough that memory stays flat on the driver.
IN_FLIGHT_PER_CPU = 2
# How long to wait for the head's port before saying it does not answer (Ray itself
# would retry for about a minute).
CONNECT_TIMEOUT_S = 5.0


class ClusterError(GenderclfError, RuntimeError):
    """The Ray cluster named by RAY_ADDRESS cannot be used; the message says what to fix."""


def cluster_address() -> str | None:
    """`RAY_ADDRESS` when set (the work then runs on that Ray cluster), else None."""
    return os.environ.get(ADDRESS_VARIABLE, "").strip() or None


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of `host:port` or `ray://host:port`; None for `auto` and the like."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast, in one line, when nothing answers at the head's address.

    Raises:
        ClusterError: the address is malformed or its port does not accept a connection.
    """
    if address.startswith(("http://", "https://")):
        raise ClusterError(
            f"RAY_ADDRESS={address} is the address of Ray's job API; genderclf connects as a "
            "driver: set RAY_ADDRESS to the head's GCS address, host:6379"
        )
    target = _host_port(address)
    if target is None:
        return  # `auto`: Ray looks for a cluster started on this machine
    try:
        socket.create_connection(target, timeout=timeout).close()
    except OSError as err:
        why = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise ClusterError(
            f"RAY_ADDRESS={address}: no Ray cluster answers there ({why}); start the "
            "cluster or fix the address, or unset RAY_ADDRESS to run on this machine"
        ) from None


def import_ray() -> Any:
    """The `ray` module, for a driver of this project (`ClusterError` when not installed).

    Ray's `uv run` hook is turned off first (`RAY_ENABLE_UV_RUN_RUNTIME_ENV=0`, unless set):
    on by default, it sees a driver started under `uv run` (`uv run genderclf ...`, `uv run
    dvc repro`) and replaces the workers' interpreter with `uv run python` in an upload of
    the driver's folder. From a checkout, that builds on every node a fresh project
    environment without the `cluster` extra, whose workers cannot start ("No module named
    'ray'"). The nodes here run their own environment (one image); the code travels as
    `py_modules` (`connect`).
    """
    os.environ.setdefault(UV_HOOK_VARIABLE, "0")
    try:
        import ray
    except ImportError:
        raise ClusterError(
            f"{ADDRESS_VARIABLE} is set but Ray is not installed here: `uv sync --extra "
            "cluster` (make setup does), or unset it to run on this machine"
        ) from None
    # Ray reads the variable when it is imported: a process that imported Ray before this
    # still has the hook on (Ray's private module; without it the variable is enough).
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and hasattr(constants, "RAY_ENABLE_UV_RUN_RUNTIME_ENV"):
        hook = os.environ[UV_HOOK_VARIABLE].lower() in ("1", "true")
        constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = hook
    return ray


def connect() -> Any:
    """Connect this process to the cluster as a driver (once); returns the `ray` module.

    Raises:
        ClusterError: Ray is not installed, the head does not answer, or it refuses the
            connection (another Ray or Python version).
    """
    address = cluster_address()
    if address is None:
        raise ClusterError(f"{ADDRESS_VARIABLE} is not set: there is no cluster to use")
    ray = import_ray()
    if ray.is_initialized():
        return ray
    check_reachable(address)
    import genderclf

    package = str(Path(genderclf.__file__).parent)
    try:
        ray.init(
            address=address,
            namespace="genderclf",
            # The driver's own code runs on the workers: the code DVC hashed for the stage.
            runtime_env={"py_modules": [package], "excludes": ["__pycache__", "*.pyc"]},
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    except (ConnectionError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ClusterError(
            f"cannot use the Ray cluster at RAY_ADDRESS={address}: {first[:400]}"
        ) from None
    resources = ray.cluster_resources()
    log.info(
        "engine: Ray cluster at %s (%d CPUs, %d GPUs, %d nodes)",
        address,
        int(resources.get("CPU", 0)),
        int(resources.get("GPU", 0)),
        len([n for n in ray.nodes() if n.get("Alive")]),
    )
    return ray


def cluster_cpus(ray: Any) -> int:
    """The CPUs the cluster has now (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _run_chunk(fn: Callable[[Any, Any], Any], context: Any, chunk: list[Any]) -> list[Any]:
    """One Ray task: the per-item function over a chunk, as a local worker runs it."""
    return [fn(context, item) for item in chunk]


@functools.cache
def _chunk_task() -> Any:
    import ray

    return ray.remote(num_cpus=1, max_retries=TASK_RETRIES, retry_exceptions=False)(_run_chunk)


def result(ray: Any, ref: Any) -> Any:
    """`ray.get(ref)`, with a GenderclfError raised in a task re-raised as itself.

    Raises:
        GenderclfError: what the task raised (e.g. an S3 object changed since its listing).
        ClusterError: the task could not be run (its retries ran out, the cluster is gone).
    """
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, GenderclfError):
            raise cause from None
        raise
    except ray.exceptions.RayError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ClusterError(f"the Ray cluster lost the work: {first[:400]}") from None


def ordered(ray: Any, submit: Iterable[Any], window: int) -> Iterator[Any]:
    """Results of the object refs `submit` yields, in that order, at most `window` pending.

    Refs are drawn from `submit` (which submits the work) only as results are taken, so
    memory stays flat; on early exit the pending work is cancelled.
    """
    pending: deque[Any] = deque()
    try:
        for ref in submit:
            pending.append(ref)
            if len(pending) >= window:
                yield result(ray, pending.popleft())
        while pending:
            yield result(ray, pending.popleft())
    finally:
        for ref in pending:
            ray.cancel(ref)


def ray_map(
    fn: Callable[[Any, Any], Any], chunks: Iterable[list[Any]], context: Any
) -> Iterator[Any]:
    """`fn(context, item)` for every item of every chunk, one Ray task per chunk, in order.

    Raises:
        ClusterError: the cluster cannot be reached or lost the work.
        GenderclfError: what `fn` raised for an item.
    """
    ray = connect()
    task = _chunk_task()
    shared = ray.put(context)  # sent to the object store once, not with every task
    name = f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"
    submit = (
        task.options(name=f"{name} [{i}]").remote(fn, shared, chunk)
        for i, chunk in enumerate(chunks)
    )
    for out in ordered(ray, submit, IN_FLIGHT_PER_CPU * cluster_cpus(ray)):
        yield from out
