"""The split stage: manifest -> train / val / test tables, deterministic for a seed.

`split_file` works on the manifest file in parts (flat memory, any size); `split_manifest`
on a table in memory. Both cut with `assign_splits`, so they give the same rows.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from genderclf.config import SPLITS, GenderclfError, SplitSettings
from genderclf.console import render_table
from genderclf.io import atomic_file

log = logging.getLogger(__name__)

Cut = Callable[[np.ndarray, np.ndarray | None, float, int], tuple[np.ndarray, np.ndarray]]


class SplitError(GenderclfError, ValueError):
    """The manifest cannot be split with the chosen strategy."""


# A split as a number: where `assign_splits` puts each row (-1: no split).
SPLIT_CODE = {s: i for i, s in enumerate(SPLITS)}
# A partition cell as a number: the splits, then "" (none given) and anything else.
NO_PARTITION, OTHER_PARTITION = -1, -2


def partition_code(value: str) -> int:
    return SPLIT_CODE.get(value, NO_PARTITION if value == "" else OTHER_PARTITION)


def _stratified(
    labels: np.ndarray, groups: np.ndarray | None, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    # Positions, not rows: train_test_split draws the same cut for any array of this length.
    values, counts = np.unique(labels, return_counts=True)
    stratify = labels if len(values) > 1 and counts.min() >= 2 else None
    return train_test_split(
        np.arange(len(labels)), test_size=fraction, random_state=seed, stratify=stratify
    )


def _grouped(
    labels: np.ndarray, groups: np.ndarray | None, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import GroupShuffleSplit

    # Group codes numbered in the identities' sorted order: GroupShuffleSplit sorts the
    # groups first, so the codes give the cut the identity strings give.
    gss = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    a, b = next(gss.split(np.zeros(len(labels)), groups=groups))
    return a, b


def _cut(
    cut: Cut, labels: np.ndarray, groups: np.ndarray | None, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    try:
        return cut(labels, groups, fraction, seed)
    except ValueError as err:  # sklearn: too few rows or identities for this fraction
        raise SplitError(
            f"cannot split {len(labels)} images: the dataset is too small ({err})"
        ) from None


def assign_splits(
    labels: np.ndarray, parts: np.ndarray, groups: np.ndarray, cfg: SplitSettings, seed: int
) -> np.ndarray:
    """Where each manifest row goes (`SPLIT_CODE`, -1 for none), by `split.strategy`.

    The rows are in path order (what makes the split independent of the manifest's row
    order); only these three columns are needed, as numbers, so this holds a few bytes
    per image however wide the manifest is.

    * `official`: the dataset's own partition column. CelebA's partition is
      identity-disjoint, so no person appears in two splits. A partition the source lacks
      (class-folder datasets often have no test folder) is carved out of train, stratified.
    * `stratified`: by label, with `split.val_fraction` and `split.test_fraction`.
    * `group`: by identity, so that no person is in two splits.

    Args:
        labels: 1 = male, 0 = female.
        parts: `partition_code` of each row's partition.
        groups: each row's identity as a code in the identities' sorted order; -1 where the
            row has no identity.

    Raises:
        SplitError: the manifest is empty, or the strategy needs a column the manifest does
            not fill, or the dataset is too small for the fractions.
    """
    if len(labels) == 0:
        raise SplitError("the manifest is empty: run `genderclf validate` first")
    if cfg.strategy == "official":
        missing = int((parts == NO_PARTITION).sum())
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
        out = {s: np.flatnonzero(parts == code) for s, code in SPLIT_CODE.items()}
        train = out["train"]
        for s, frac in (("test", cfg.test_fraction), ("val", cfg.val_fraction)):
            if out[s].size == 0:
                if train.size == 0:
                    raise SplitError(f"official split has neither {s} nor train images")
                log.warning(
                    "split: no %s partition in the dataset; carving %.0f%% of train", s, 100 * frac
                )
                a, b = _cut(_stratified, labels[train], None, frac, seed)
                train, out[s] = train[a], train[b]
        out["train"] = train
    else:
        if cfg.strategy == "group":
            if (groups < 0).any():
                raise SplitError(
                    "split.strategy=group needs an identity for every image; this dataset has "
                    "none (use split.strategy=stratified)"
                )
            cut: Cut = _grouped
        else:
            cut = _stratified
        rest, test = _cut(cut, labels, groups, cfg.test_fraction, seed)
        a, b = _cut(
            cut, labels[rest], groups[rest], cfg.val_fraction / (1 - cfg.test_fraction), seed
        )
        out = {"train": rest[a], "val": rest[b], "test": test}
    for s in SPLITS:
        if out[s].size == 0:
            raise SplitError(f"split {s!r} is empty: the dataset is too small for these fractions")
    where = np.full(len(labels), -1, dtype=np.int8)
    for s, code in SPLIT_CODE.items():
        where[out[s]] = code
    return where


def identity_codes(identities: pd.Series) -> np.ndarray:
    """Each identity as its rank among the distinct identities (sorted); -1 for none."""
    ids = identities.astype(str).to_numpy()
    _, codes = np.unique(ids, return_inverse=True)
    codes = codes.astype(np.int64)
    codes[identities.fillna("").astype(str).to_numpy() == ""] = -1
    return codes


def split_manifest(
    manifest: pd.DataFrame, cfg: SplitSettings, seed: int
) -> dict[str, pd.DataFrame]:
    """Split a manifest held in memory by `split.strategy` (see `assign_splits`).

    Returns:
        {split: its rows, sorted by path}.

    Raises:
        SplitError: the strategy needs a column the manifest does not have.
    """
    if manifest.empty:
        raise SplitError("the manifest is empty: run `genderclf validate` first")
    df = manifest.sort_values("path").reset_index(drop=True)
    parts = np.array(
        [partition_code(p) for p in df["partition"].fillna("").astype(str)], dtype=np.int8
    )
    where = assign_splits(
        df["label"].to_numpy(np.int64), parts, identity_codes(df["identity"]), cfg, seed
    )
    return {
        s: df.iloc[np.flatnonzero(where == code)].reset_index(drop=True)
        for s, code in SPLIT_CODE.items()
    }


@dataclass(frozen=True)
class SplitCounts:
    """What a split of the manifest file gave: images and males per split, and the number
    of identities in more than one split (None when the manifest has no identities)."""

    counts: dict[str, dict[str, int]]
    identity_overlap: int | None


def split_file(manifest: Path, out_dir: Path, cfg: SplitSettings, seed: int) -> SplitCounts:
    """Split the manifest CSV into `out_dir/{train,val,test}.csv`, with flat memory.

    The manifest is read row by row into a scratch SQLite table, which sorts it by path.
    Validate writes it in path order already: its rows are then read back as they came,
    with no sort. `assign_splits` cuts it (from its labels, partitions and identity codes
    only, a few bytes per image), and the rows are written back, each split in path order.
    The files hold exactly the rows, columns and cell text `split_manifest` +
    `write_splits` give.

    Raises:
        SplitError: see `assign_splits`; a label other than 0 or 1.
    """
    from genderclf.data.scratch import Scratch

    # Split reads its table in order, once: a small page cache is as fast as a large one,
    # and keeps the peak from growing with the manifest until a large cache is full.
    with Scratch(prefix="genderclf-split-", cache_mib=2) as scratch:
        header, in_path_order = _load_manifest(scratch, manifest)
        db = scratch.db
        n = int(scratch.value("SELECT COUNT(*) FROM rows") or 0)
        db.execute(
            "CREATE TABLE ids AS SELECT identity, ROW_NUMBER() OVER (ORDER BY identity) - 1 "
            "AS code FROM (SELECT DISTINCT identity FROM rows)"
        )
        db.execute("CREATE UNIQUE INDEX ids_identity ON ids (identity)")
        # A few bytes per image: labels are 0 or 1, identity codes are below the row count.
        labels = np.empty(n, dtype=np.int8)
        parts = np.empty(n, dtype=np.int8)
        groups = np.empty(n, dtype=np.int32 if n < 2**31 else np.int64)
        # The same order either way: by path, ties in file order.
        order = "ORDER BY r.pos" if in_path_order else "ORDER BY r.path, r.pos"
        for i, (label, part, identity, code) in enumerate(
            scratch.rows(
                f"SELECT r.label, r.part, r.identity, i.code FROM rows r JOIN ids i "
                f"USING (identity) {order}"
            )
        ):
            labels[i], parts[i] = label, partition_code(part)
            groups[i] = -1 if identity == "" else code
        where = assign_splits(labels, parts, groups, cfg, seed)
        with contextlib.ExitStack() as stack:
            files = []
            for s in SPLITS:
                tmp = stack.enter_context(atomic_file(out_dir / f"{s}.csv"))
                f = stack.enter_context(open(tmp, "w", newline="", encoding="utf-8"))
                f.write(header)
                files.append(f)
            for i, (line,) in enumerate(scratch.rows(f"SELECT r.line FROM rows r {order}")):
                if where[i] >= 0:
                    files[where[i]].write(line)
    counts = {
        s: {"images": int((where == c).sum()), "male": int(labels[where == c].sum())}
        for s, c in SPLIT_CODE.items()
    }
    overlap = None
    if (groups >= 0).any():
        present = [np.unique(groups[(where == c) & (groups >= 0)]) for c in SPLIT_CODE.values()]
        _, times = np.unique(np.concatenate(present), return_counts=True)
        overlap = int((times > 1).sum())
    return SplitCounts(counts, overlap)


def _line(writer: Any, buf: io.StringIO, row: list[str]) -> str:
    buf.seek(0)
    buf.truncate()
    writer.writerow(row)
    return buf.getvalue()


def _load_manifest(scratch: Any, manifest: Path) -> tuple[str, bool]:
    """The manifest's rows into the scratch table `rows`.

    Returns:
        The header line, and whether the rows came in path order (each path >= the one
        before: Python's string order, which is SQLite's).

    Each row is kept as the CSV line the split files get: its cells as text, as pandas
    reads and writes them (`keep_default_na=False`: an empty cell stays empty).
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    scratch.db.execute(
        "CREATE TABLE rows (pos INTEGER PRIMARY KEY, path TEXT, label INTEGER, part TEXT, "
        "identity TEXT, line TEXT)"
    )
    with open(manifest, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None) or []
        missing = [c for c in ("path", "label", "partition", "identity") if c not in header]
        if missing:
            raise SplitError(
                f"{manifest}: no column {', '.join(missing)}: run `dvc repro validate` again"
            )
        ip, il, ipart, iid = (header.index(c) for c in ("path", "label", "partition", "identity"))
        in_order = True

        def rows():
            nonlocal in_order
            last = ""
            for line_no, r in enumerate(reader, start=2):
                if not r:
                    continue
                if r[ip] < last:
                    in_order = False
                last = r[ip]
                try:
                    label = int(r[il])
                except ValueError:
                    label = -1
                if label not in (0, 1):
                    raise SplitError(f"{manifest}, line {line_no}: label {r[il]!r} is not 0 or 1")
                yield line_no, r[ip], label, r[ipart], r[iid], _line(writer, buf, r)

        scratch.insert("rows", rows(), 6)
        scratch.db.commit()
    return _line(writer, buf, header), in_order


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


def read_split_head(splits_dir: Path, split: str, n: int = 32) -> pd.DataFrame:
    """The first `n` rows of a split table (read without the rest)."""
    p = Path(splits_dir) / f"{split}.csv"
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: run `genderclf split` (or `dvc repro split`)")
    return pd.read_csv(p, dtype={"identity": str, "partition": str}, keep_default_na=False, nrows=n)


def identity_overlap(splits: dict[str, pd.DataFrame]) -> int:
    """Number of identities present in more than one split (0 when identity-disjoint)."""
    sets = [set(df["identity"].astype(str)) - {""} for df in splits.values()]
    seen: set[str] = set()
    overlap: set[str] = set()
    for s in sets:
        overlap |= seen & s
        seen |= s
    return len(overlap)
