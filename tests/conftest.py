"""Shared fixtures: the real params.yaml shrunk to a tiny config, and tiny synthetic images.

Shrink, don't mock: tests run the real stage functions on a config derived from the
repository's own `params.yaml`, with a few images of a few dozen pixels.
"""

from __future__ import annotations

import copy
import csv
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from genderclf.config import Settings, parse_settings
from genderclf.data import sample

REPO_ROOT = Path(__file__).resolve().parents[1]

# Dotted keys of params.yaml and the tiny values tests use. Keys that only change speed
# (`workers`) are set to 1 so that tests do not spawn process pools unless they mean to.
TINY = {
    "base.image_size": 32,
    "data.sample.num_images": 120,
    "data.sample.images_per_identity": 4,
    "data.sample.workers": 1,
    "data.kaggle.backoff_seconds": 0.01,
    "data.kaggle.retries": 2,
    "data.s3.retries": 0,
    "validate.min_rows": 10,
    "validate.workers": 1,
    "augment.shard_size": 16,
    "augment.workers": 1,
}


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set `section.sub.key` in a nested dict; the parent sections must already exist."""
    *parents, last = key.split(".")
    node = raw
    for p in parents:
        node = node[p]
    node[last] = value


def shrink(raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A deep copy of the params dict with the TINY values and then `overrides` applied."""
    out = copy.deepcopy(raw)
    for k, v in {**TINY, **(overrides or {})}.items():
        set_dotted(out, k, v)
    return out


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
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def tiny_params(real_params: dict[str, Any]) -> dict[str, Any]:
    """The real params shrunk for tests, as a plain dict (e.g. to write a params.yaml)."""
    return shrink(real_params)


@pytest.fixture(scope="session")
def make_settings(real_params: dict[str, Any]) -> Callable[..., Settings]:
    """Factory: `make_settings({"augment.copies": 0})` -> tiny Settings with overrides."""

    def make(overrides: dict[str, Any] | None = None) -> Settings:
        return parse_settings(shrink(real_params, overrides), "tiny params")

    return make


@pytest.fixture(scope="session")
def tiny_settings(make_settings: Callable[..., Settings]) -> Settings:
    """The real params.yaml turned into a tiny config through the real validation."""
    return make_settings()


# --- synthetic images ---------------------------------------------------------------------


def write_image(
    path: Path,
    size: tuple[int, int] = (48, 56),
    mode: str = "RGB",
    fmt: str = "JPEG",
    seed: int = 0,
) -> Path:
    """Write a small noise image (unique per seed, so no two seeds give equal bytes)."""
    rng = np.random.default_rng(seed)
    w, h = size
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    if mode == "P":
        im = rgb.quantize(colors=16)
    elif mode == "RGBA":
        im = rgb.convert("RGBA")
        im.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L"))
    else:
        im = rgb.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt)
    return path


@pytest.fixture(scope="session")
def make_image() -> Callable[..., Path]:
    """Factory fixture around `write_image`."""
    return write_image


def write_celeba(
    root: Path,
    labels: Iterable[int],
    *,
    partitions: Iterable[int] | None = None,
    identities: Iterable[int] | None = None,
    size: tuple[int, int] = (48, 56),
    seed: int = 0,
) -> list[str]:
    """Write a CelebA-format folder (Kaggle layout) with one noise image per label.

    Args:
        labels: 1 (male) / 0 (female) per image; written as Male = 1 / -1.
        partitions: CelebA partition codes (0 train, 1 val, 2 test) per image.
        identities: person ids per image (identity_CelebA.txt); omitted when None.

    Returns:
        The image ids written (`000001.jpg`, ...).
    """
    labels = list(labels)
    img_dir = root / sample.IMAGE_SUBDIR
    img_dir.mkdir(parents=True, exist_ok=True)
    ids = [f"{i + 1:06d}.jpg" for i in range(len(labels))]
    for i, name in enumerate(ids):
        write_image(img_dir / name, size=size, seed=seed * 100_000 + i)
    with open(root / sample.ATTR_FILE, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", *sample.CELEBA_ATTRIBUTES])
        for name, lab in zip(ids, labels, strict=True):
            w.writerow(
                [
                    name,
                    *((1 if lab else -1) if a == "Male" else -1 for a in sample.CELEBA_ATTRIBUTES),
                ]
            )
    if partitions is not None:
        with open(root / sample.PARTITION_FILE, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image_id", "partition"])
            w.writerows(zip(ids, partitions, strict=True))
    if identities is not None:
        lines = (f"{n} {i}\n" for n, i in zip(ids, identities, strict=True))
        (root / sample.IDENTITY_FILE).write_text("".join(lines))
    return ids


@pytest.fixture(scope="session")
def make_celeba() -> Callable[..., list[str]]:
    """Factory fixture around `write_celeba`."""
    return write_celeba
