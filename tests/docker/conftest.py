"""Fixtures of the `docker` tests: the engine, the images built on the local base image, and
a pipeline repository with the shrunk params.yaml that the containers run.

The engine is the one running, or one started here (as root) with this machine's flags
(tests/docker/engine.py), and stopped again at the end. Images are built once a session;
BuildKit's cache makes a rebuild of unchanged sources take seconds.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.docker.engine import (
    LOCAL_BASE,
    Engine,
    docker_cli,
    ensure_local_base,
    start_dockerd,
    stop_dockerd,
)
from tests.docker.pipeline_repo import make_pipeline_repo

CPU_IMAGE = "genderclf:cpu"
GPU_IMAGE = "genderclf:gpu"
POSTGRES_IMAGE = "genderclf-test/postgres:15"
S3_IMAGE = "genderclf-test/s3:moto"
_ENGINES: list[Engine] = []


@pytest.fixture(scope="session")
def engine(tmp_path_factory) -> Iterator[Engine]:
    """A Docker engine that answers: the running one, else dockerd started (and later
    stopped) here with --storage-driver vfs --bridge=none --iptables=false."""
    try:
        found = Engine(docker_cli())
    except RuntimeError as err:
        pytest.fail(str(err))
    if found.answers():
        _ENGINES.append(found)
        yield found
        return
    if os.geteuid() != 0:
        pytest.fail("no Docker engine answers, and only root can start one here")
    log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    try:
        proc = start_dockerd(log)
    except RuntimeError as err:
        pytest.fail(str(err))
    started = Engine(found.cli, started_here=True)
    _ENGINES.append(started)
    try:
        yield started
    finally:
        stop_dockerd(proc)


@pytest.fixture(scope="session")
def local_base(engine: Engine) -> str:
    """The base image made from Debian's packages (docker/base/build.sh), built if missing."""
    try:
        ensure_local_base(engine)
    except RuntimeError as err:
        pytest.fail(str(err))
    return LOCAL_BASE


@pytest.fixture(scope="session")
def cpu_image(engine: Engine, local_base: str) -> str:
    """docker/Dockerfile built on the local base, tagged as docker/compose.yaml names it."""
    engine.build(CPU_IMAGE, "docker/Dockerfile", {"BASE_IMAGE": local_base})
    return CPU_IMAGE


@pytest.fixture(scope="session")
def gpu_image(engine: Engine, local_base: str) -> str:
    """docker/Dockerfile.gpu built on the local base (multi-GB: the `docker_gpu` tests only)."""
    engine.build(GPU_IMAGE, "docker/Dockerfile.gpu", {"BASE_IMAGE": local_base})
    return GPU_IMAGE


@pytest.fixture(scope="session")
def stand_in_images(engine: Engine, local_base: str) -> dict[str, str]:
    """The test stack's PostgreSQL (Debian's package) and S3 server (moto) images."""
    engine.build(POSTGRES_IMAGE, "docker/test/postgres.Dockerfile", {"BASE_IMAGE": local_base})
    engine.build(S3_IMAGE, "docker/test/s3.Dockerfile", {"BASE_IMAGE": local_base})
    return {"postgres": POSTGRES_IMAGE, "s3": S3_IMAGE}


@pytest.fixture(scope="session")
def pipeline_source(tmp_path_factory, real_params) -> Path:
    """A git repository of the pipeline (dvc.yaml, src/, flows/, prefect.yaml) with the
    shrunk params.yaml committed: what the containers clone or get mounted."""
    return make_pipeline_repo(tmp_path_factory.mktemp("pipeline") / "source", real_params)


def pytest_terminal_summary(terminalreporter) -> None:
    """The build times and image sizes measured in this session (docs/docker.md quotes them)."""
    builds = {tag: b for e in _ENGINES for tag, b in e.builds.items()}
    if builds:
        terminalreporter.section("docker builds")
        for tag, b in builds.items():
            freed = (
                f"   build cache dropped: {b['cache_freed'] / 1e9:5.2f} GB"
                if "cache_freed" in b
                else ""
            )
            terminalreporter.write_line(
                f"{tag:32s} {b['seconds']:7.1f} s   {b['bytes'] / 1e9:6.2f} GB{freed}"
            )
