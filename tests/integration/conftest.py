"""Fixtures for the model stages: a tiny prepared sample and a real MLflow store per test.

The data goes through the real stage functions (download of the bundled sample, the
dataset reader, split, augment) once per session; tests that train or register copy
nothing and only read it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from genderclf.config import Settings

SAMPLE_IMAGES = 600

# What the model-stage tests shrink on top of tests/conftest.py's TINY values. Split by
# person (`group`), so held-out accuracy is on faces of people the model never saw.
MODEL_TINY: dict[str, Any] = {
    "data.sample.num_images": SAMPLE_IMAGES,
    "data.sample.images_per_identity": 4,
    "split.strategy": "group",
    "split.val_fraction": 0.2,
    "split.test_fraction": 0.2,
    "augment.copies": 0,
    "augment.shard_size": 64,
    "train.backbone": "simple_cnn",
    "train.weights": None,
    "train.batch_size": 16,
    "train.epochs_head": 1,
    "train.epochs_finetune": 1,
    "train.mixed_precision": "off",
    "register.retries": 0,
}


@pytest.fixture(scope="session")
def model_settings(make_settings) -> Callable[..., Settings]:
    """Factory: tiny settings for the model stages, with optional extra overrides."""

    def make(overrides: dict[str, Any] | None = None) -> Settings:
        return make_settings({**MODEL_TINY, **(overrides or {})})

    return make


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory, model_settings) -> tuple[Path, Path]:
    """(raw dir with SOURCE.json, splits dir): the bundled sample, downloaded and split."""
    from genderclf.data.layouts import read_layout
    from genderclf.data.sources import download
    from genderclf.data.split import split_manifest, write_splits

    root = tmp_path_factory.mktemp("sample")
    settings = model_settings()
    download(settings, root / "raw", progress=False)
    parts = split_manifest(read_layout(root / "raw").rows, settings.split, settings.base.seed)
    write_splits(parts, root / "splits")
    return root / "raw", root / "splits"


def _prepare(tmp_path_factory, settings: Settings, sample_data, name: str) -> Path:
    from genderclf.data.augment import run_augment

    raw, splits = sample_data
    out = tmp_path_factory.mktemp(name) / "prepared"
    run_augment(settings, raw, splits, out, progress=False)
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

    Artifacts of a SQLite store go to ./mlruns, hence the chdir; stage paths in
    `genderclf.config` are relative to the cwd as well.
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
