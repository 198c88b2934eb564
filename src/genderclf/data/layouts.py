"""Dataset layouts on disk -> one table of candidate images with integer labels.

Layouts:
* `celeba`: Kaggle's CelebA (`list_attr_celeba.csv`, `list_eval_partition.csv`,
  `img_align_celeba/img_align_celeba/*.jpg`, optional `identity_CelebA.txt`).
* `class_folders`: `Training|Train|Validation|Test` x class folders (`male/female`,
  `Male/Female`, `man/woman`, any case), optionally under a root such as `Dataset/`,
  as in `cashutosh/gender-classification-dataset` and
  `ashishjangra27/gender-recognition-200k-images-celeba`; or a flat root of class folders.

Everything that looks like a dataset file either becomes a candidate row or a reject with
a reason; nothing is dropped silently.

The readers stream: they walk an index of the folder's files (`genderclf.data.scratch.
RawTree`, in SQLite) and yield one row or reject at a time, so the validate stage reads a
dataset of any size with flat memory. `read_layout` collects a stream into a DataFrame
for callers that want the whole table at once.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from genderclf.config import GenderclfError
from genderclf.data.celeba import (
    CELEBA_ATTR,
    CELEBA_IDENTITY,
    CELEBA_IMAGES,
    CELEBA_PARTITION,
    CELEBA_PARTITIONS,
)
from genderclf.data.labels import LabelError, label_from_celeba, label_from_folder
from genderclf.data.scratch import RawTree, Scratch, join
from genderclf.images import IMAGE_EXTENSIONS

PARTITION_FOLDERS = {
    "training": "train",
    "train": "train",
    "validation": "val",
    "valid": "val",
    "val": "val",
    "test": "test",
    "testing": "test",
}
BASE_COLUMNS = ["path", "label", "partition", "identity"]


class LayoutError(GenderclfError, ValueError):
    """The folder does not match a known dataset layout."""


@dataclass
class Candidates:
    """Rows to check (paths relative to the raw folder) and files already rejected."""

    layout: str
    rows: pd.DataFrame
    rejected: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class LayoutStream:
    """A layout read as a stream: `events` yields `(True, row)` for a candidate (a tuple of
    values in `columns` order; an unknown attribute is None) and `(False, (path, reason))`
    for a reject, in the order the dataset lists them."""

    layout: str
    columns: list[str]
    events: Iterator[tuple[bool, tuple]]


def _parent(rel: str) -> str:
    return rel.rpartition("/")[0]


def _class_folder_root(tree: RawTree) -> tuple[str, bool] | None:
    """Find the folder holding partition or class folders. Returns (folder, has_partitions)."""
    queue = [""]
    for _ in range(3):
        nxt = []
        for d in queue:
            subs = tree.subdirs(d)
            parts = [s for s in subs if s.lower() in PARTITION_FOLDERS]
            if parts and any(
                label_from_folder(c) is not None for p in parts for c in tree.subdirs(join(d, p))
            ):
                return d, True
            if any(label_from_folder(s) is not None for s in subs):
                return d, False
            nxt.extend(join(d, s) for s in subs)
        queue = nxt
    return None


def _detect(tree: RawTree) -> str:
    if tree.find(CELEBA_ATTR) is not None:
        return "celeba"
    if _class_folder_root(tree) is not None:
        return "class_folders"
    found = tree.top()[:20]
    raise LayoutError(
        f"{tree.root}: unknown dataset layout. Expected CelebA ({CELEBA_ATTR} + "
        "img_align_celeba/) or class folders (Training|Validation|Test x male|female). Found: "
        + (", ".join(found) if found else "an empty folder")
        + ". Set data.layout explicitly or fix the source."
    )


def detect_layout(root: str | os.PathLike[str]) -> str:
    """Return `celeba` or `class_folders`.

    Raises:
        LayoutError: neither fits, with a listing of what was found.
    """
    with Scratch() as scratch:
        return _detect(RawTree(scratch, root))


def _csv_rows(path: Path) -> tuple[list[str], Iterator[list[str]]]:
    """The header and a stream of the non-empty rows of a CSV file.

    Raises:
        LayoutError: the file is empty or not readable as CSV text (also while streaming).
    """
    # utf-8-sig: a byte-order mark (as Excel saves CSV) is not part of the first header;
    # newline="": the csv module reads CRLF line endings itself.
    f = open(path, newline="", encoding="utf-8-sig")  # noqa: SIM115 (closed by the stream)
    try:
        reader = csv.reader(f)
        header = next(reader, None)
    except (UnicodeDecodeError, csv.Error) as err:
        f.close()
        raise LayoutError(f"{path}: not a readable CSV file ({err})") from None
    if header is None:
        f.close()
        raise LayoutError(f"{path}: empty file, expected a header row")

    def rows() -> Iterator[list[str]]:
        with f:
            try:
                for r in reader:
                    if r:
                        yield r
            except (UnicodeDecodeError, csv.Error) as err:
                raise LayoutError(f"{path}: not a readable CSV file ({err})") from None

    return [h.strip() for h in header], rows()


def _celeba_tables(tree: RawTree, base: str) -> None:
    """The partition and identity files into scratch tables (later rows win, as in a dict)."""
    db = tree.scratch
    db.db.execute("CREATE TABLE partitions (image_id TEXT PRIMARY KEY, part TEXT)")
    db.db.execute("CREATE TABLE identities (image_id TEXT PRIMARY KEY, identity TEXT)")
    db.db.execute("CREATE TABLE seen (image_id TEXT PRIMARY KEY)")
    part_path = tree.path(join(base, CELEBA_PARTITION))
    if part_path.is_file():
        p_header, p_rows = _csv_rows(part_path)
        if p_header[:2] != ["image_id", "partition"]:
            raise LayoutError(f"{part_path}: header must be 'image_id,partition'; got {p_header}")
        db.db.executemany(
            "INSERT OR REPLACE INTO partitions VALUES (?, ?)",
            (
                (r[0].strip(), CELEBA_PARTITIONS.get(r[1].strip(), f"invalid:{r[1]}"))
                for r in p_rows
                if len(r) >= 2
            ),
        )
    id_path = tree.path(join(base, CELEBA_IDENTITY))
    if id_path.is_file():

        def pairs() -> Iterator[tuple[str, str]]:
            with open(id_path, encoding="utf-8-sig", errors="replace") as f:
                for raw in f:
                    for line in raw.splitlines():
                        parts = line.split()
                        if len(parts) == 2:
                            yield parts[0], parts[1]

        db.db.executemany("INSERT OR REPLACE INTO identities VALUES (?, ?)", pairs())


def stream_celeba(tree: RawTree) -> LayoutStream:
    """A CelebA-format folder as a stream; `Male` -1/1 -> label 0/1, attributes kept.

    Raises:
        LayoutError: the attribute file or image folder is missing or malformed.
    """
    attr_rel = tree.find(CELEBA_ATTR)
    if attr_rel is None:
        raise LayoutError(f"{tree.root}: {CELEBA_ATTR} not found (needed for the celeba layout)")
    base = _parent(attr_rel)
    img_dir = next(
        (
            d
            for d in (join(base, CELEBA_IMAGES.as_posix()), join(base, CELEBA_IMAGES.parts[0]))
            if tree.is_dir(d) and tree.has_files(d)
        ),
        None,
    )
    if img_dir is None:
        raise LayoutError(
            f"{tree.path(base)}: image folder img_align_celeba/img_align_celeba/ not found"
        )
    attr_path = tree.path(attr_rel)
    header, attr_rows = _csv_rows(attr_path)
    if "image_id" not in header or "Male" not in header:
        raise LayoutError(
            f"{attr_path}: header must contain 'image_id' and 'Male'; got {header[:6]}..."
        )
    id_col = header.index("image_id")
    attrs = [h for h in header if h != "image_id"]
    _celeba_tables(tree, base)
    db = tree.scratch

    def events() -> Iterator[tuple[bool, tuple]]:
        for r in attr_rows:
            image_id = r[id_col].strip() if len(r) > id_col else ""
            if len(r) != len(header):
                yield (
                    False,
                    (
                        f"{attr_rel}:{image_id or '?'}",
                        f"malformed_row: {len(r)} fields, expected {len(header)}",
                    ),
                )
                continue
            if db.db.execute("INSERT OR IGNORE INTO seen VALUES (?)", (image_id,)).rowcount == 0:
                yield False, (f"{attr_rel}:{image_id}", "duplicate_label_row")
                continue
            if not tree.has_file(img_dir, image_id):
                yield (
                    False,
                    (
                        f"{img_dir}/{image_id}",
                        f"missing_file: listed in {CELEBA_ATTR} but not on disk",
                    ),
                )
                continue
            path = f"{img_dir}/{image_id}"
            values = dict(zip(header, (v.strip() for v in r), strict=True))
            try:
                label = label_from_celeba(values["Male"])
            except LabelError as err:
                yield False, (path, f"invalid_label: {err}")
                continue
            part = db.value("SELECT part FROM partitions WHERE image_id = ?", (image_id,)) or ""
            if part.startswith("invalid:"):
                yield False, (path, f"invalid_partition: {part[8:]!r} is not 0, 1 or 2")
                continue
            identity = db.value("SELECT identity FROM identities WHERE image_id = ?", (image_id,))
            cells = (1 if values[a] == "1" else (0 if values[a] == "-1" else None) for a in attrs)
            yield True, (path, label, part, identity or "", *cells)
        for (name,) in db.rows(
            "SELECT name FROM files WHERE dir = ? AND name NOT LIKE '.%' AND name NOT IN "
            "(SELECT image_id FROM seen) ORDER BY name",
            (img_dir,),
        ):
            yield False, (f"{img_dir}/{name}", f"missing_label: no row in {CELEBA_ATTR}")

    return LayoutStream("celeba", BASE_COLUMNS + attrs, events())


def stream_class_folders(tree: RawTree) -> LayoutStream:
    """Class folders as a stream; the partition comes from the parent folder if any.

    Raises:
        LayoutError: no class folders were found.
    """
    found = _class_folder_root(tree)
    if found is None:
        raise LayoutError(f"{tree.root}: no class folders (male/female, man/woman) found")
    base, has_partitions = found
    groups: list[tuple[str, str]] = []
    if has_partitions:
        for p in tree.subdirs(base):
            if p.lower() in PARTITION_FOLDERS:
                groups.append((join(base, p), PARTITION_FOLDERS[p.lower()]))
    else:
        groups.append((base, ""))

    def events() -> Iterator[tuple[bool, tuple]]:
        for folder, part in groups:
            # An image next to the class folders has no label: reject it rather than drop it.
            for name in list(tree.files(folder)):
                if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                    yield False, (join(folder, name), "no_label: image not inside a class folder")
            for d in tree.subdirs(folder):
                label = label_from_folder(d)
                for path in tree.walk(join(folder, d)):
                    suffix = Path(path).suffix
                    if label is None:
                        yield (
                            False,
                            (
                                path,
                                f"no_label: folder {d!r} is not a "
                                "known class (male/female/man/woman)",
                            ),
                        )
                    elif suffix.lower() not in IMAGE_EXTENSIONS:
                        yield False, (path, f"not_an_image: extension {suffix!r}")
                    else:
                        yield True, (path, label, part, "")

    return LayoutStream("class_folders", list(BASE_COLUMNS), events())


def stream_layout(tree: RawTree, layout: str = "auto") -> LayoutStream:
    """Read the indexed folder with the given layout (`auto` detects it).

    Raises:
        LayoutError: the layout does not fit the folder.
    """
    if layout == "auto":
        layout = _detect(tree)
    return stream_celeba(tree) if layout == "celeba" else stream_class_folders(tree)


def _collect(root: str | os.PathLike[str], layout: str) -> Candidates:
    with Scratch() as scratch:
        stream = stream_layout(RawTree(scratch, root), layout)
        rows: list[tuple] = []
        rejected: list[tuple[str, str]] = []
        for is_row, value in stream.events:
            (rows if is_row else rejected).append(value)
    base = len(BASE_COLUMNS)
    # An unknown attribute is pandas' NA, as the manifest writes it (an empty cell).
    rows = [(*r[:base], *(pd.NA if v is None else v for v in r[base:])) for r in rows]
    return Candidates(stream.layout, pd.DataFrame(rows, columns=stream.columns), rejected)


def read_celeba(root: str | os.PathLike[str]) -> Candidates:
    """Candidates from a CelebA-format folder (the whole table; see `stream_celeba`).

    Raises:
        LayoutError: the attribute file or image folder is missing or malformed.
    """
    return _collect(root, "celeba")


def read_class_folders(root: str | os.PathLike[str]) -> Candidates:
    """Candidates from class folders (the whole table; see `stream_class_folders`).

    Raises:
        LayoutError: no class folders were found.
    """
    return _collect(root, "class_folders")


def read_layout(root: str | os.PathLike[str], layout: str = "auto") -> Candidates:
    """Read `root` with the given layout (`auto` detects it), as one table.

    Raises:
        LayoutError: the layout does not fit the folder.
    """
    return _collect(root, layout)
