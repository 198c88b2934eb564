"""The split stage: manifest -> train / val / test tables, deterministic for a seed."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from genderclf.config import SPLITS, GenderclfError, SplitSettings
from genderclf.console import render_table
from genderclf.io import atomic_file

log = logging.getLogger(__name__)

Cut = Callable[[pd.DataFrame, float, int], tuple[pd.DataFrame, pd.DataFrame]]


class SplitError(GenderclfError, ValueError):
    """The manifest cannot be split with the chosen strategy."""


def _stratified(df: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    from sklearn.model_selection import train_test_split

    counts = df["label"].value_counts()
    stratify = df["label"] if len(counts) > 1 and counts.min() >= 2 else None
    return train_test_split(df, test_size=fraction, random_state=seed, stratify=stratify)


def _grouped(df: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    from sklearn.model_selection import GroupShuffleSplit

    gss = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    a, b = next(gss.split(df, groups=df["identity"].astype(str)))
    return df.iloc[a], df.iloc[b]


def _cut(cut: Cut, df: pd.DataFrame, fraction: float, seed: int):
    try:
        return cut(df, fraction, seed)
    except ValueError as err:  # sklearn: too few rows or identities for this fraction
        raise SplitError(
            f"cannot split {len(df)} images: the dataset is too small ({err})"
        ) from None


def split_manifest(
    manifest: pd.DataFrame, cfg: SplitSettings, seed: int
) -> dict[str, pd.DataFrame]:
    """Split the manifest by `split.strategy`.

    * `official`: the dataset's own partition column. CelebA's partition is
      identity-disjoint, so no person appears in two splits. A partition the source lacks
      (class-folder datasets often have no test folder) is carved out of train, stratified.
    * `stratified`: by label, with `split.val_fraction` and `split.test_fraction`.
    * `group`: by identity, so that no person is in two splits.

    Raises:
        SplitError: the strategy needs a column the manifest does not have.
    """
    if manifest.empty:
        raise SplitError("the manifest is empty: run `genderclf validate` first")
    df = manifest.sort_values("path").reset_index(drop=True)
    if cfg.strategy == "official":
        parts = df["partition"].fillna("").astype(str)
        missing = int((parts == "").sum())
        what = (
            "the dataset has no partition column values"
            if missing == len(parts)
            else f"{missing} images have no partition"
        )
        if missing:
            raise SplitError(
                f"split.strategy=official but {what}; use split.strategy="
                "stratified (or group when identities are known)"
            )
        out = {s: df[parts == s] for s in SPLITS}
        train = out["train"]
        for s, frac in (("test", cfg.test_fraction), ("val", cfg.val_fraction)):
            if out[s].empty:
                if train.empty:
                    raise SplitError(f"official split has neither {s} nor train images")
                log.warning(
                    "split: no %s partition in the dataset; carving %.0f%% of train", s, 100 * frac
                )
                train, out[s] = _cut(_stratified, train, frac, seed)
        out["train"] = train
    else:
        if cfg.strategy == "group":
            ids = df["identity"].fillna("").astype(str)
            if (ids == "").any():
                raise SplitError(
                    "split.strategy=group needs an identity for every image; this dataset has "
                    "none (use split.strategy=stratified)"
                )
            cut = _grouped
        else:
            cut = _stratified
        rest, test = _cut(cut, df, cfg.test_fraction, seed)
        train, val = _cut(cut, rest, cfg.val_fraction / (1 - cfg.test_fraction), seed)
        out = {"train": train, "val": val, "test": test}
    for s in SPLITS:
        if out[s].empty:
            raise SplitError(f"split {s!r} is empty: the dataset is too small for these fractions")
    return {s: out[s].sort_values("path").reset_index(drop=True) for s in SPLITS}


def balance(splits: dict[str, pd.DataFrame]) -> dict[str, dict[str, int]]:
    """Images and male images per split."""
    return {s: {"images": len(df), "male": int(df["label"].sum())} for s, df in splits.items()}


def balance_table(counts: dict[str, dict[str, int]]) -> str:
    """A small text table of `balance` counts and the male share per split."""
    rows = [
        (
            s,
            c["images"],
            c["male"],
            c["images"] - c["male"],
            f"{100 * c['male'] / max(1, c['images']):.1f}%",
        )
        for s, c in counts.items()
    ]
    return render_table(
        ["split", "images", "male", "female", "male %"],
        rows,
        right=["images", "male", "female", "male %"],
    )


def write_splits(splits: dict[str, pd.DataFrame], out_dir: Path) -> None:
    for s, df in splits.items():
        with atomic_file(out_dir / f"{s}.csv") as tmp:
            df.to_csv(tmp, index=False)


def read_split(splits_dir: Path, split: str) -> pd.DataFrame:
    p = Path(splits_dir) / f"{split}.csv"
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: run `genderclf split` (or `dvc repro split`)")
    return pd.read_csv(p, dtype={"identity": str, "partition": str}, keep_default_na=False)


def identity_overlap(splits: dict[str, pd.DataFrame]) -> int:
    """Number of identities present in more than one split (0 when identity-disjoint)."""
    sets = [set(df["identity"].astype(str)) - {""} for df in splits.values()]
    seen: set[str] = set()
    overlap: set[str] = set()
    for s in sets:
        overlap |= seen & s
        seen |= s
    return len(overlap)
