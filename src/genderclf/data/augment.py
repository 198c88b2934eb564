"""The augment stage: splits -> sharded TFRecords at `base.image_size`, plus a preview.

Train gets `augment.copies` extra variants per image (random flip, rotation, zoom, shift,
brightness, contrast); val and test are resized only. Images are decoded, resized and
augmented in worker processes (both cores by default) and written by the parent into
shards. The whole folder is written to a temporary sibling and renamed into place with
`meta.json` last, so an interrupted or failed run never leaves shards that look complete.
"""

from __future__ import annotations

import errno
import logging
import multiprocessing as mp
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from genderclf.config import SPLITS, Settings, cpu_workers
from genderclf.data.augment_ops import AugmentParams, augment, encode_jpeg, fit_square, load_rgb
from genderclf.data.fsutil import atomic_dir, clean_stale_temps, write_json
from genderclf.data.split import read_split
from genderclf.data.tfrecords import META_FILE, ShardWriter

log = logging.getLogger(__name__)
_SPLIT_SEED = {"train": 0, "val": 1, "test": 2}
CHUNK = 64


class AugmentError(RuntimeError):
    """The prepared data could not be written; nothing partial is left marked complete."""


_JOB: dict[str, Any] = {}


def _init(job: dict[str, Any]) -> None:
    _JOB.clear()
    _JOB.update(job)


def _process(chunk: list[tuple[int, str, int]]) -> list[tuple[str, int, list[bytes]]]:
    """Decode, resize and augment a chunk of (index, path, label) rows in a worker."""
    j = _JOB
    out = []
    for index, path, label in chunk:
        base = fit_square(load_rgb(os.path.join(j["raw_dir"], path)), j["size"], j["resize"])
        images = [encode_jpeg(base, j["quality"])]
        if j["copies"]:
            rng = np.random.default_rng([j["seed"], j["split_seed"], index])
            for _ in range(j["copies"]):
                images.append(encode_jpeg(augment(base, j["params"], rng), j["quality"]))
        out.append((path, label, images))
    return out


def _chunks(rows: list[tuple[int, str, int]]) -> Iterator[list[tuple[int, str, int]]]:
    for i in range(0, len(rows), CHUNK):
        yield rows[i : i + CHUNK]


def augment_params(settings: Settings) -> AugmentParams:
    a = settings.augment
    return AugmentParams(a.flip, a.rotation_deg, a.zoom, a.shift, a.brightness, a.contrast)


def _write_split(
    split: str, df: pd.DataFrame, settings: Settings, raw_dir: Path, out_dir: Path,
    pool: ProcessPoolExecutor | None, progress: bool,
) -> dict[str, Any]:  # fmt: skip
    from tqdm import tqdm

    a = settings.augment
    copies = a.copies if split == "train" else 0
    order = np.arange(len(df))
    if split == "train":  # mix the shards; variants of one image stay adjacent
        order = np.random.default_rng([settings.base.seed, 9]).permutation(len(df))
    rows = [(int(i), str(df["path"].iat[i]), int(df["label"].iat[i])) for i in order]
    job = {
        "raw_dir": str(raw_dir), "size": settings.base.image_size, "resize": a.resize,
        "quality": a.jpeg_quality, "copies": copies, "seed": settings.base.seed,
        "split_seed": _SPLIT_SEED[split], "params": augment_params(settings),
    }  # fmt: skip
    writer = ShardWriter(out_dir, split, len(rows) * (1 + copies), a.shard_size)
    bar = tqdm(total=len(rows), desc=f"augment {split}", unit="img", disable=not progress)
    if pool is None:
        _init(job)
        results = map(_process, _chunks(rows))
    else:
        # The job (a few hundred bytes) travels with each chunk: one pool serves all splits.
        results = pool.map(_process_with_job, ((job, c) for c in _chunks(rows)))
    males = 0
    for chunk in results:
        for path, label, images in chunk:
            for v, img in enumerate(images):
                writer.write(img, label, path, v)
            males += label
        bar.update(len(chunk))
    bar.close()
    records = writer.close()
    return {"images": len(rows), "records": records, "copies": copies, "male": males,
            "shards": writer.files}  # fmt: skip


def _process_with_job(arg: tuple[dict[str, Any], list[tuple[int, str, int]]]):
    job, chunk = arg
    _init(job)
    return _process(chunk)


def run_augment(
    settings: Settings, raw_dir: Path, splits_dir: Path, out_dir: Path, progress: bool = True
) -> dict[str, Any]:
    """Write `out_dir` (prepared TFRecords and meta.json) from the split tables.

    Returns:
        The meta record (image size, per-split counts and shard files).

    Raises:
        AugmentError: the output cannot be written (disk full, read-only folder),
            with no partial output left in place.
        FileNotFoundError: the split tables are missing.
    """
    splits = {s: read_split(splits_dir, s) for s in SPLITS}
    clean_stale_temps(out_dir.parent, out_dir.name)
    workers = cpu_workers(settings.augment.workers)
    try:
        with atomic_dir(out_dir) as tmp:
            pool = None
            if workers > 1:
                pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
            try:
                meta_splits = {
                    s: _write_split(s, splits[s], settings, raw_dir, tmp, pool, progress)
                    for s in SPLITS
                }
            finally:
                if pool is not None:
                    pool.shutdown(cancel_futures=True)
            meta = {
                "image_size": settings.base.image_size,
                "encoding": "jpeg",
                "jpeg_quality": settings.augment.jpeg_quality,
                "resize": settings.augment.resize,
                "augment": settings.augment.model_dump(),
                "seed": settings.base.seed,
                "splits": meta_splits,
            }
            write_json(tmp / META_FILE, meta)  # last: its presence marks the data complete
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EPERM):
            raise AugmentError(
                f"cannot write prepared data to {out_dir}: {os.strerror(err.errno)}. Free disk "
                "space or fix the folder's permissions, then run `dvc repro augment` again; "
                "no partial output was kept."
            ) from err
        raise
    return meta


def preview(settings: Settings, raw_dir: Path, splits_dir: Path, out_png: Path, n: int = 6) -> None:
    """Save a grid: each row one train image, original then its augmented variants."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = read_split(splits_dir, "train").head(n)
    copies = max(settings.augment.copies, 3)
    p = augment_params(settings)
    size = settings.base.image_size
    fig, axes = plt.subplots(len(df), copies + 1, figsize=(1.6 * (copies + 1), 1.7 * len(df)),
                             squeeze=False)  # fmt: skip
    for r, (path, label) in enumerate(zip(df["path"], df["label"], strict=True)):
        base = fit_square(load_rgb(str(raw_dir / path)), size, settings.augment.resize)
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
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
