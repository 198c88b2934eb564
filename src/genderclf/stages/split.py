"""The split stage: the manifest -> `data/splits/{train,val,test}.csv` (`split.strategy`)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from genderclf.config import Paths, Settings
from genderclf.data.split import balance, identity_overlap, split_manifest, write_splits


@dataclass(frozen=True)
class SplitReport:
    strategy: str
    counts: dict[str, dict[str, int]]  # split -> {"images": n, "male": n}
    identity_overlap: int | None  # people in more than one split; None without identities


def run(settings: Settings, paths: Paths) -> SplitReport:
    """Split the validated manifest, deterministically for `base.seed`.

    Raises:
        FileNotFoundError: no manifest (run the validate stage).
        SplitError: the strategy does not fit the data (names the setting to change).
    """
    if not paths.manifest.is_file():
        raise FileNotFoundError(f"{paths.manifest} not found: run `dvc repro validate` first")
    manifest = pd.read_csv(
        paths.manifest, dtype={"identity": str, "partition": str}, keep_default_na=False
    )
    parts = split_manifest(manifest, settings.split, settings.base.seed)
    write_splits(parts, paths.splits)
    known = (manifest["identity"] != "").any()
    return SplitReport(
        settings.split.strategy, balance(parts), identity_overlap(parts) if known else None
    )
