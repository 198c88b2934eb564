"""The split stage: the manifest -> `data/splits/{train,val,test}.csv` (`split.strategy`)."""

from __future__ import annotations

from dataclasses import dataclass

from genderclf.config import Paths, Settings
from genderclf.data.split import split_file


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
    # In parts: the manifest is never held whole (flat memory at any dataset size).
    done = split_file(paths.manifest, paths.splits, settings.split, settings.base.seed)
    return SplitReport(settings.split.strategy, done.counts, done.identity_overlap)
