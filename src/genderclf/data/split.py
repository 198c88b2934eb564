"""The split stage: manifest -> train / val / test tables, deterministic for a seed."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from genderclf.config import SPLITS, SplitSettings

log = logging.getLogger(__name__)


class SplitError(ValueError):
    """The manifest cannot be split with the chosen strategy."""


def _stratified(df: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    from sklearn.model_selection import train_test_split

    counts = df["label"].value_counts()
    stratify = df["label"] if len(counts) > 1 and counts.min() >= 2 else None
    try:
        a, b = train_test_split(df, test_size=fraction, random_state=seed, stratify=stratify)
    except ValueError as err:  # sklearn: too few rows for this fraction
        raise SplitError(
            f"cannot split {len(df)} images: the dataset is too small ({err})"
        ) from None
    return a, b


def _grouped(df: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    from sklearn.model_selection import GroupShuffleSplit

    gss = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    try:
        a, b = next(gss.split(df, groups=df["identity"].astype(str)))
    except ValueError as err:  # sklearn: too few identities for this fraction
        raise SplitError(
            f"cannot split {len(df)} images: the dataset is too small ({err})"
        ) from None
    return df.iloc[a], df.iloc[b]


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
        if (parts == "").all():
            raise SplitError(
                "split.strategy=official but the dataset has no partition column values; "
                "use split.strategy=stratified (or group when identities are known)"
            )
        if (parts == "").any():
            raise SplitError(
                f"split.strategy=official but {(parts == '').sum()} images have no partition; "
                "use split.strategy=stratified"
            )
        out = {s: df[parts == s] for s in SPLITS}
        train = out["train"]
        for s, frac in (("test", cfg.test_fraction), ("val", cfg.val_fraction)):
            if out[s].empty:
                if train.empty:
                    raise SplitError(f"official split has neither {s} nor train images")
                log.warning("split: no %s partition in the dataset; carving %.0f%% of train",
                            s, 100 * frac)  # fmt: skip
                train, out[s] = _stratified(train, frac, seed)
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
        rest, test = cut(df, cfg.test_fraction, seed)
        train, val = cut(rest, cfg.val_fraction / (1 - cfg.test_fraction), seed)
        out = {"train": train, "val": val, "test": test}
    for s in SPLITS:
        if out[s].empty:
            raise SplitError(f"split {s!r} is empty: the dataset is too small for these fractions")
    return {s: out[s].sort_values("path").reset_index(drop=True) for s in SPLITS}


def balance_table(splits: dict[str, pd.DataFrame]) -> str:
    """A small text table of counts and male share per split."""
    lines = [f"{'split':<6} {'images':>8} {'male':>7} {'female':>7} {'male %':>7}"]
    for s, df in splits.items():
        m = int(df["label"].sum())
        lines.append(
            f"{s:<6} {len(df):>8} {m:>7} {len(df) - m:>7} {100 * m / max(1, len(df)):>6.1f}%"
        )
    return "\n".join(lines)


def write_splits(splits: dict[str, pd.DataFrame], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for s, df in splits.items():
        tmp = out_dir / f".{s}.csv.tmp"
        df.to_csv(tmp, index=False)
        os.replace(tmp, out_dir / f"{s}.csv")


def read_split(splits_dir: Path, split: str) -> pd.DataFrame:
    p = splits_dir / f"{split}.csv"
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


__all__ = ["balance_table", "identity_overlap", "read_split", "split_manifest", "write_splits"]
