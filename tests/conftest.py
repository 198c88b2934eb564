"""Shared fixtures: the real params.yaml shrunk to a tiny config, and tiny synthetic images.

Shrink, don't mock: tests run the real stage functions on a config derived from the
repository's own `params.yaml`, with a few images of a few dozen pixels. The helpers
behind these fixtures live in `tests/helpers/` (tests import those, never this file).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import images, params

from genderclf.config import Paths, Settings, parse_settings


@pytest.fixture(autouse=True)
def _mlflow_environment_restored():
    """Undo any MLFLOW_* variable a test leaves behind.

    `mlflow.set_tracking_uri` / `set_registry_uri` also write MLFLOW_*_URI into os.environ,
    outside monkeypatch's reach; a leftover server address would be inherited by every
    later test's subprocesses (dvc, genderclf, flows).
    """
    before = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    yield
    for k in [k for k in os.environ if k.startswith("MLFLOW_") and k not in before]:
        del os.environ[k]
    os.environ.update(before)


@pytest.fixture(scope="session")
def real_params() -> dict[str, Any]:
    """The repository's params.yaml as a dict (never modified; copy before changing)."""
    return params.real_params()


@pytest.fixture(scope="session")
def tiny_params(real_params: dict[str, Any]) -> dict[str, Any]:
    """The real params shrunk for tests, as a plain dict (e.g. to write a params.yaml)."""
    return params.shrink(real_params)


@pytest.fixture(scope="session")
def make_settings(real_params: dict[str, Any]) -> Callable[..., Settings]:
    """Factory: `make_settings({"augment.copies": 0})` -> tiny Settings with overrides."""

    def make(overrides: dict[str, Any] | None = None) -> Settings:
        return parse_settings(params.shrink(real_params, overrides), "tiny params")

    return make


@pytest.fixture(scope="session")
def tiny_settings(make_settings: Callable[..., Settings]) -> Settings:
    """The real params.yaml turned into a tiny config through the real validation."""
    return make_settings()


@pytest.fixture(scope="session")
def pipeline_params() -> dict[str, Any]:
    """Tiny params for a whole `dvc repro` or flow run (`tests.helpers.params.PIPELINE`)."""
    return params.pipeline_params()


@pytest.fixture(scope="session")
def make_image() -> Callable[..., Path]:
    """Factory fixture around `tests.helpers.images.write_image`."""
    return images.write_image


@pytest.fixture(scope="session")
def make_celeba() -> Callable[..., list[str]]:
    """Factory fixture around `tests.helpers.images.write_celeba`."""
    return images.write_celeba


# --- the model stages: a tiny prepared sample and a real MLflow store per test --------------
# The data goes through the real stage functions (download of the bundled sample, the
# dataset reader, split, augment) once per session; tests that train or register only read it.


@pytest.fixture(scope="session")
def model_settings(make_settings) -> Callable[..., Settings]:
    """Factory: tiny settings for the model stages, with optional extra overrides."""

    def make(overrides: dict[str, Any] | None = None) -> Settings:
        return make_settings({**params.MODEL_TINY, **(overrides or {})})

    return make


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory, model_settings) -> tuple[Path, Path]:
    """(raw dir with SOURCE.json, splits dir): the bundled sample, downloaded and split."""
    from genderclf.data.layouts import read_layout
    from genderclf.data.split import split_manifest, write_splits
    from genderclf.stages import download

    root = tmp_path_factory.mktemp("sample")
    settings = model_settings()
    download.run(settings, Paths(raw=root / "raw"), progress=False)
    parts = split_manifest(read_layout(root / "raw").rows, settings.split, settings.base.seed)
    write_splits(parts, root / "splits")
    return root / "raw", root / "splits"


def _prepare(tmp_path_factory, settings: Settings, sample_data, name: str) -> Path:
    from genderclf.stages import augment

    raw, splits = sample_data
    out = tmp_path_factory.mktemp(name) / "prepared"
    augment.run(
        settings,
        Paths(raw=raw, splits=splits, prepared=out, augment_preview=out.parent / "preview.png"),
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, model_settings, sample_data) -> Path:
    """Prepared TFRecords at 32px, originals only (for tests of mechanics, not learning)."""
    return _prepare(tmp_path_factory, model_settings(), sample_data, "prepared")


@pytest.fixture(scope="session")
def prepared_augmented(tmp_path_factory, model_settings, sample_data) -> Path:
    """As `prepared`, with 1 augmented copy per train image (more steps per epoch)."""
    settings = model_settings({"augment.copies": 1})
    return _prepare(tmp_path_factory, settings, sample_data, "prepared_aug")


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A real MLflow tracking store (SQLite) in tmp_path, which is also the cwd.

    Artifacts of a SQLite store go to ./mlruns, hence the chdir; the stage paths of
    `genderclf.config.PATHS` are relative to the cwd as well.
    """
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    yield uri
    import mlflow

    while mlflow.active_run():  # never leak a run into the next test
        mlflow.end_run()
    # configure() sets MLflow's process-wide URIs; leave none pointing at this tmp store
    # (monkeypatch then restores the environment variables).
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


@pytest.fixture
def empty_tempdir(tmp_path, monkeypatch) -> Path:
    """An empty folder that is the temporary folder of this process (`tempfile`) and of the
    processes it starts (`TMPDIR`): a test then asserts the code left nothing in it."""
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    return temp


# --- a Ray cluster on loopback, one per session ------------------------------------------------


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """A real Ray cluster for the whole session: a head and a second node on 127.0.0.1, one
    CPU each, separate process groups (`tests.helpers.ray_cluster.RayCluster`), with Ray's
    token authentication on (a fresh token).

    The nodes hold the test S3 server's credentials in their own environment (what a real
    node gets from its role or secret store); drivers get `cluster.driver_env()` (the
    address and the token). A test that kills the second node leaves it to the next one's
    `cluster.ensure_nodes()`.
    """
    import secrets

    from tests.helpers.ray_cluster import ray_cluster as started
    from tests.helpers.servers import s3_env

    env = {
        **s3_env(),
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
    }
    with started(cpus=1, env=env) as cluster:
        yield cluster
