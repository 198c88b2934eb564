"""Offline augmentation and the TFRecords it writes (the augment stage's work).

Each train variant is made with one fused affine warp (flip, rotation, zoom and shift
composed into a single matrix, one resample) plus a vectorised brightness/contrast step,
instead of one resample per transform. PIL and NumPy only in the worker processes: they
start fast and stay small; the parent writes the shards.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from genderclf.config import AugmentSettings, Settings
from genderclf.console import Progress
from genderclf.contracts import SplitShards
from genderclf.data.tfrecords import ShardWriter
from genderclf.images import fit_square, load_rgb
from genderclf.io import cpu_workers, parallel_map

_SPLIT_SEED = {"train": 0, "val": 1, "test": 2}
CHUNK = 64


@dataclass(frozen=True)
class AugmentParams:
    """The augmentation ranges (a plain copy of the `augment` settings for workers)."""

    flip: bool
    rotation_deg: float
    zoom: float
    shift: float
    brightness: float
    contrast: float

    @classmethod
    def of(cls, a: AugmentSettings) -> AugmentParams:
        return cls(a.flip, a.rotation_deg, a.zoom, a.shift, a.brightness, a.contrast)


def random_affine(size: int, p: AugmentParams, rng: np.random.Generator) -> tuple[float, ...]:
    """The PIL AFFINE coefficients (output -> input) for one random flip/rotate/zoom/shift."""
    theta = math.radians(rng.uniform(-p.rotation_deg, p.rotation_deg))
    scale = rng.uniform(1 - p.zoom, 1 + p.zoom)
    tx, ty = rng.uniform(-p.shift, p.shift, 2) * size
    flip = -1.0 if (p.flip and rng.random() < 0.5) else 1.0
    cos, sin = math.cos(theta), math.sin(theta)
    # inverse of: out = C + R(theta) * scale * F * (in - C) + T
    m = np.array([[flip * cos, flip * sin], [-sin, cos]]) / scale
    c = np.array([size / 2, size / 2])
    off = c - m @ (c + np.array([tx, ty]))
    return (m[0, 0], m[0, 1], off[0], m[1, 0], m[1, 1], off[1])


def random_photometric(arr: np.ndarray, p: AugmentParams, rng: np.random.Generator) -> np.ndarray:
    """Random contrast (around the image mean) then brightness, on a uint8 HxWx3 array."""
    x = arr.astype(np.float32)
    c = rng.uniform(1 - p.contrast, 1 + p.contrast)
    b = rng.uniform(1 - p.brightness, 1 + p.brightness)
    mean = x.mean(axis=(0, 1), keepdims=True)
    x = ((x - mean) * c + mean) * b
    return np.clip(x, 0, 255).astype(np.uint8)


def augment(base: Image.Image, p: AugmentParams, rng: np.random.Generator) -> Image.Image:
    """One augmented variant of an already square-resized image (same size)."""
    size = base.size[0]
    warped = base.transform(
        (size, size), Image.AFFINE, random_affine(size, p, rng), resample=Image.BILINEAR
    )
    return Image.fromarray(random_photometric(np.asarray(warped), p, rng))


def encode_jpeg(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _process(
    job: dict[str, Any], chunk: list[tuple[int, str, int]]
) -> list[tuple[str, int, list[bytes]]]:
    """Decode, resize and augment a chunk of (index, path, label) rows in a worker."""
    out = []
    for index, path, label in chunk:
        base = fit_square(load_rgb(os.path.join(job["raw_dir"], path)), job["size"], job["resize"])
        images = [encode_jpeg(base, job["quality"])]
        if job["copies"]:
            rng = np.random.default_rng([job["seed"], job["split_seed"], index])
            for _ in range(job["copies"]):
                images.append(encode_jpeg(augment(base, job["params"], rng), job["quality"]))
        out.append((path, label, images))
    return out


def write_split(
    split: str,
    df: pd.DataFrame,
    settings: Settings,
    raw_dir: Path,
    out_dir: Path,
    progress: bool = True,
) -> SplitShards:
    """Write one split's shards into `out_dir`: originals, plus `augment.copies` variants
    of each train image. Returns the split's entry of the prepared data (`meta.json`).

    Raises:
        OSError: a shard cannot be written (ENOSPC, EROFS, EACCES).
    """
    a = settings.augment
    copies = a.copies if split == "train" else 0
    order = np.arange(len(df))
    if split == "train":  # mix the shards; variants of one image stay adjacent
        order = np.random.default_rng([settings.base.seed, 9]).permutation(len(df))
    rows = [(int(i), str(df["path"].iat[i]), int(df["label"].iat[i])) for i in order]
    job = {
        "raw_dir": str(raw_dir),
        "size": settings.base.image_size,
        "resize": a.resize,
        "quality": a.jpeg_quality,
        "copies": copies,
        "seed": settings.base.seed,
        "split_seed": _SPLIT_SEED[split],
        "params": AugmentParams.of(a),
    }
    chunks = [rows[i : i + CHUNK] for i in range(0, len(rows), CHUNK)]
    workers = min(cpu_workers(a.workers), len(chunks))
    writer = ShardWriter(out_dir, split, len(rows) * (1 + copies), a.shard_size)
    males = 0
    with Progress(len(rows), f"augment {split}", enabled=progress) as bar:
        for chunk in parallel_map(_process, chunks, workers=workers, context=job):
            for path, label, images in chunk:
                for v, img in enumerate(images):
                    writer.write(img, label, path, v)
                males += label
            bar.update(len(chunk))
    records = writer.close()
    return SplitShards(
        images=len(rows), records=records, copies=copies, male=males, shards=writer.files
    )


def preview(
    settings: Settings, raw_dir: Path, train: pd.DataFrame, out_png: Path, n: int = 6
) -> None:
    """Save a grid: each row one train image, original then its augmented variants."""
    import matplotlib

    from genderclf.io import atomic_file

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = train.head(n)
    copies = max(settings.augment.copies, 3)
    p = AugmentParams.of(settings.augment)
    size = settings.base.image_size
    fig, axes = plt.subplots(
        len(df), copies + 1, figsize=(1.6 * (copies + 1), 1.7 * len(df)), squeeze=False
    )
    for r, (path, label) in enumerate(zip(df["path"], df["label"], strict=True)):
        base = fit_square(load_rgb(Path(raw_dir) / path), size, settings.augment.resize)
        rng = np.random.default_rng([settings.base.seed, 0, r])
        ims = [base] + [augment(base, p, rng) for _ in range(copies)]
        for c, im in enumerate(ims):
            ax = axes[r][c]
            ax.imshow(im)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("original" if c == 0 else f"variant {c}", fontsize=8)
        axes[r][0].set_ylabel("male" if label == 1 else "female", fontsize=8)
    fig.suptitle(f"augment preview ({size}px; copies={settings.augment.copies})", fontsize=9)
    fig.tight_layout()
    with atomic_file(out_png) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
