"""The augment stage: splits -> sharded TFRecords at `base.image_size`, plus a preview.

Train gets `augment.copies` extra variants per image (random flip, rotation, zoom, shift,
brightness, contrast); val and test are resized only. The images are processed in local
processes or on the Ray cluster RAY_ADDRESS names, with the same bytes either way. The
whole folder is written to a temporary sibling and renamed into place with `meta.json`
last, so an interrupted or failed run never leaves shards that look complete.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, replace
from pathlib import Path

from genderclf.config import SPLITS, GenderclfError, Paths, Settings
from genderclf.contracts import PreparedData
from genderclf.data.augment import preview, write_split
from genderclf.data.remote import open_raw
from genderclf.data.split import read_split_head
from genderclf.io import atomic_dir


class AugmentError(GenderclfError, RuntimeError):
    """The prepared data could not be written; nothing partial is left marked complete."""


@dataclass(frozen=True)
class AugmentReport:
    data: PreparedData  # what data/prepared/meta.json holds
    prepared: Path
    preview: Path


def run(settings: Settings, paths: Paths, progress: bool = True) -> AugmentReport:
    """Write `paths.prepared` (shards and meta.json) from the split tables, and the preview.

    Raises:
        AugmentError: the output cannot be written (disk full, read-only folder), with no
            partial output left in place.
        FileNotFoundError: the split tables are missing.
    """
    files = {s: paths.split_file(s) for s in SPLITS}
    for f in files.values():
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: run `genderclf split` (or `dvc repro split`)")
    s3 = settings.data.s3
    source = open_raw(paths.raw, s3.endpoint_url, s3.retries)
    try:
        with atomic_dir(paths.prepared) as tmp:
            # The one producer of the model's input facts (image size, resize mode): the
            # later stages read them from here, never from the settings.
            data = PreparedData(
                image_size=settings.base.image_size,
                resize=settings.augment.resize,
                encoding="jpeg",
                jpeg_quality=settings.augment.jpeg_quality,
                seed=settings.base.seed,
                augment=settings.augment.model_dump(exclude={"workers"}),  # speed only
                splits={
                    s: write_split(s, files[s], settings, source, tmp, progress) for s in SPLITS
                },
            )
            data.write(tmp)  # last: meta.json's presence marks the data complete
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EPERM):
            raise AugmentError(
                f"cannot write prepared data to {paths.prepared}: {os.strerror(err.errno)}. "
                "Free disk space or fix the folder's permissions, then run `dvc repro "
                "augment` again; no partial output was kept."
            ) from err
        raise
    preview(settings, source, read_split_head(paths.splits, "train"), paths.augment_preview)
    return AugmentReport(
        replace(data, folder=paths.prepared), paths.prepared, paths.augment_preview
    )
