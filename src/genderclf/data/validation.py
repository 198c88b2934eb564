"""Image checks for the validate stage: every file judged by `genderclf.images`, in parallel.

A check never raises for a bad file: it returns the reason, which validation writes to
`rejected.csv`. It does raise when the dataset itself is not what its listing says (an
S3 object changed since `data/raw/LISTING.csv`) or cannot be reached at all: that stops
the stage instead of rejecting every image.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from genderclf.config import ValidateSettings
from genderclf.console import Progress
from genderclf.data.remote import Pin, RawSource
from genderclf.images import IMAGE_FORMATS, ImageError, decode, to_rgb
from genderclf.io import cpu_workers, parallel_map

# Images per chunk: one task of a local worker or of the Ray cluster.
CHUNK = 128


@dataclass(frozen=True)
class ImageCheck:
    path: str
    ok: bool
    reason: str = ""
    sha256: str = ""
    width: int = 0
    height: int = 0
    mode: str = ""
    format: str = ""


def check_image(
    path: str,
    root: str | RawSource,
    min_side: int,
    allow_format_mismatch: bool,
    pin: Pin | None = None,
) -> ImageCheck:
    """Check one image file (relative `path` below `root`); returns the reason if unusable.

    Args:
        root: the raw folder, or the RawSource that reads it (S3 objects by reference).
        pin: the listed version of an S3 object (by-reference mode).

    Raises:
        ObjectChanged: a pinned S3 object differs from its listing.
        RawUnreachable: the raw data cannot be read from here at all.
    """
    source = root if isinstance(root, RawSource) else RawSource(str(root))
    try:
        data = source.read(path, pin)
        im = decode(data)
        to_rgb(im)  # grayscale, RGBA, CMYK and palette images are converted downstream
    except ImageError as err:
        return ImageCheck(path, False, f"{err.reason}: {err}")
    fmt = im.format or ""
    width, height = im.size
    expected = IMAGE_FORMATS.get(Path(path).suffix.lower())
    if expected and fmt != expected and not allow_format_mismatch:
        return ImageCheck(
            path,
            False,
            f"format_mismatch: {fmt} data behind a "
            f"{Path(path).suffix} name (set validate.allow_format_mismatch)",
        )
    if min(width, height) < min_side:
        return ImageCheck(
            path, False, f"too_small: {width}x{height}, below validate.min_side={min_side}"
        )
    digest = hashlib.sha256(data).hexdigest()
    return ImageCheck(path, True, "", digest, width, height, im.mode, fmt)


def _check(job: dict, item: tuple[str, Pin | None]) -> ImageCheck:
    path, pin = item
    return check_image(path, job["source"], job["min_side"], job["allow_format_mismatch"], pin)


def iter_checks(
    items: Iterable[tuple[str, Pin | None]], source: RawSource, cfg: ValidateSettings, n: int
) -> Iterator[ImageCheck]:
    """Check every (path, pin) item, in input order, over `validate.workers` processes or
    the Ray cluster (`genderclf.io.parallel_map`); `n` is the number of items."""
    job = {
        "source": source,
        "min_side": cfg.min_side,
        "allow_format_mismatch": cfg.allow_format_mismatch,
    }
    workers = min(cpu_workers(cfg.workers), max(1, n // 64))
    return parallel_map(_check, items, workers=workers, context=job, chunksize=CHUNK)


def check_images(
    paths: list[str], root: str | os.PathLike[str], cfg: ValidateSettings, progress: bool = True
) -> list[ImageCheck]:
    """Check every image below the local folder `root`, in parallel, in input order."""
    source = RawSource(str(Path(root).resolve()))
    with Progress(len(paths), "validate", enabled=progress) as bar:
        return list(bar.wrap(iter_checks(((p, None) for p in paths), source, cfg, len(paths))))
