"""Image checks for the validate stage: every file judged by `genderclf.images`, in parallel.

A check never raises for a bad file: it returns the reason, which validation writes to
`rejected.csv`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from genderclf.config import ValidateSettings
from genderclf.console import Progress
from genderclf.images import IMAGE_FORMATS, ImageError, decode, read_bytes, to_rgb
from genderclf.io import cpu_workers, parallel_map


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


def check_image(path: str, root: str, min_side: int, allow_format_mismatch: bool) -> ImageCheck:
    """Check one image file (relative `path` below `root`); returns the reason if unusable."""
    try:
        data = read_bytes(Path(root) / path)
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


def _check(job: dict, path: str) -> ImageCheck:
    return check_image(path, **job)


def check_images(
    paths: list[str], root: str | os.PathLike[str], cfg: ValidateSettings, progress: bool = True
) -> list[ImageCheck]:
    """Check every image, in parallel over `validate.workers` processes, in input order."""
    job = {
        "root": str(root),
        "min_side": cfg.min_side,
        "allow_format_mismatch": cfg.allow_format_mismatch,
    }
    workers = min(cpu_workers(cfg.workers), max(1, len(paths) // 64))
    with Progress(len(paths), "validate", enabled=progress) as bar:
        return list(
            bar.wrap(parallel_map(_check, paths, workers=workers, context=job, chunksize=128))
        )
