"""Tiny synthetic images and a CelebA-format folder of them, for data tests."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from genderclf.data import sample


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
