"""The augment stage: splits -> sharded TFRecords at `base.image_size`, plus a preview.

Train gets `augment.copies` extra variants per image (random flip, rotation, zoom, shift,
brightness, contrast); val and test are resized only. The whole folder is written to a
temporary sibling and renamed into place with `meta.json` last, so an interrupted or
failed run never leaves shards that look complete.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, replace
from pathlib import Path

from genderclf.config import SPLITS, GenderclfError, Paths, Settings
from genderclf.contracts import PreparedData
from genderclf.data.augment import preview, write_split
from genderclf.data.split import read_split
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
    splits = {s: read_split(paths.splits, s) for s in SPLITS}
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
                    s: write_split(s, splits[s], settings, paths.raw, tmp, progress) for s in SPLITS
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
    preview(settings, paths.raw, splits["train"], paths.augment_preview)
    return AugmentReport(
        replace(data, folder=paths.prepared), paths.prepared, paths.augment_preview
    )
