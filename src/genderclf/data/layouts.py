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
"""

from __future__ import annotations

import csv
import os
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


def _rel(p: Path, root: Path) -> str:
    return p.relative_to(root).as_posix()


def _find(root: Path, name: str, max_depth: int = 3) -> Path | None:
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        dirnames[:] = (
            sorted(d for d in dirnames if not d.startswith(".")) if depth < max_depth else []
        )
        if name in filenames:
            return Path(dirpath) / name
    return None


def _subdirs(p: Path) -> list[Path]:
    return sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))


def _class_folder_root(root: Path) -> tuple[Path, bool] | None:
    """Find the folder holding partition or class folders. Returns (folder, has_partitions)."""
    queue = [root]
    for _ in range(3):
        nxt = []
        for d in queue:
            subs = _subdirs(d)
            parts = [s for s in subs if s.name.lower() in PARTITION_FOLDERS]
            if parts and any(
                label_from_folder(c.name) is not None for p in parts for c in _subdirs(p)
            ):
                return d, True
            if any(label_from_folder(s.name) is not None for s in subs):
                return d, False
            nxt.extend(subs)
        queue = nxt
    return None


def detect_layout(root: str | os.PathLike[str]) -> str:
    """Return `celeba` or `class_folders`.

    Raises:
        LayoutError: neither fits, with a listing of what was found.
    """
    root = Path(root)
    if _find(root, CELEBA_ATTR) is not None:
        return "celeba"
    if _class_folder_root(root) is not None:
        return "class_folders"
    found = sorted(_rel(p, root) + ("/" if p.is_dir() else "") for p in root.iterdir())[:20]
    raise LayoutError(
        f"{root}: unknown dataset layout. Expected CelebA ({CELEBA_ATTR} + img_align_celeba/) "
        "or class folders (Training|Validation|Test x male|female). Found: "
        + (", ".join(found) if found else "an empty folder")
        + ". Set data.layout explicitly or fix the source."
    )


def _read_csv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    # utf-8-sig: a byte-order mark (as Excel saves CSV) is not part of the first header;
    # newline="": the csv module reads CRLF line endings itself.
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise LayoutError(f"{path}: empty file, expected a header row")
            return [h.strip() for h in header], [r for r in reader if r]
    except (UnicodeDecodeError, csv.Error) as err:
        raise LayoutError(f"{path}: not a readable CSV file ({err})") from None


def read_celeba(root: str | os.PathLike[str]) -> Candidates:
    """Candidates from a CelebA-format folder; `Male` -1/1 -> label 0/1, attributes kept.

    Raises:
        LayoutError: the attribute file or image folder is missing or malformed.
    """
    root = Path(root)
    attr_path = _find(root, CELEBA_ATTR)
    if attr_path is None:
        raise LayoutError(f"{root}: {CELEBA_ATTR} not found (needed for the celeba layout)")
    base = attr_path.parent
    img_dir = next(
        (
            d
            for d in (base / CELEBA_IMAGES, base / CELEBA_IMAGES.parts[0])
            if d.is_dir() and any(f.is_file() for f in d.iterdir())
        ),
        None,
    )
    if img_dir is None:
        raise LayoutError(f"{base}: image folder img_align_celeba/img_align_celeba/ not found")

    header, attr_rows = _read_csv_rows(attr_path)
    if "image_id" not in header or "Male" not in header:
        raise LayoutError(
            f"{attr_path}: header must contain 'image_id' and 'Male'; got {header[:6]}..."
        )
    id_col = header.index("image_id")
    attrs = [h for h in header if h != "image_id"]
    partitions: dict[str, str] = {}
    part_path = base / CELEBA_PARTITION
    if part_path.is_file():
        p_header, p_rows = _read_csv_rows(part_path)
        if p_header[:2] != ["image_id", "partition"]:
            raise LayoutError(f"{part_path}: header must be 'image_id,partition'; got {p_header}")
        for r in p_rows:
            if len(r) >= 2:
                partitions[r[0].strip()] = CELEBA_PARTITIONS.get(r[1].strip(), f"invalid:{r[1]}")
    identities: dict[str, str] = {}
    id_path = base / CELEBA_IDENTITY
    if id_path.is_file():
        for line in id_path.read_text(encoding="utf-8-sig", errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 2:
                identities[parts[0]] = parts[1]

    rejected: list[tuple[str, str]] = []
    rows: list[dict] = []
    files = {
        p.name: p for p in sorted(img_dir.iterdir()) if p.is_file() and not p.name.startswith(".")
    }
    seen: set[str] = set()
    for r in attr_rows:
        image_id = r[id_col].strip() if len(r) > id_col else ""
        if len(r) != len(header):
            rejected.append(
                (
                    f"{_rel(attr_path, root)}:{image_id or '?'}",
                    f"malformed_row: {len(r)} fields, expected {len(header)}",
                )
            )
            continue
        if image_id in seen:
            rejected.append((f"{_rel(attr_path, root)}:{image_id}", "duplicate_label_row"))
            continue
        seen.add(image_id)
        f = files.get(image_id)
        if f is None:
            rejected.append(
                (
                    f"{_rel(img_dir, root)}/{image_id}",
                    f"missing_file: listed in {CELEBA_ATTR} but not on disk",
                )
            )
            continue
        values = dict(zip(header, (v.strip() for v in r), strict=True))
        try:
            label = label_from_celeba(values["Male"])
        except LabelError as err:
            rejected.append((_rel(f, root), f"invalid_label: {err}"))
            continue
        part = partitions.get(image_id, "")
        if part.startswith("invalid:"):
            rejected.append((_rel(f, root), f"invalid_partition: {part[8:]!r} is not 0, 1 or 2"))
            continue
        row = {
            "path": _rel(f, root),
            "label": label,
            "partition": part,
            "identity": identities.get(image_id, ""),
        }
        for a in attrs:
            v = values[a]
            row[a] = 1 if v == "1" else (0 if v == "-1" else pd.NA)
        rows.append(row)
    for name, f in files.items():
        if name not in seen:
            rejected.append((_rel(f, root), f"missing_label: no row in {CELEBA_ATTR}"))
    df = pd.DataFrame(rows, columns=BASE_COLUMNS + attrs)
    return Candidates("celeba", df, rejected)


def read_class_folders(root: str | os.PathLike[str]) -> Candidates:
    """Candidates from class folders; the partition comes from the parent folder if any.

    Raises:
        LayoutError: no class folders were found.
    """
    root = Path(root)
    found = _class_folder_root(root)
    if found is None:
        raise LayoutError(f"{root}: no class folders (male/female, man/woman) found")
    base, has_partitions = found
    groups: list[tuple[Path, str]] = []
    if has_partitions:
        for p in _subdirs(base):
            if p.name.lower() in PARTITION_FOLDERS:
                groups.append((p, PARTITION_FOLDERS[p.name.lower()]))
    else:
        groups.append((base, ""))
    rows: list[dict] = []
    rejected: list[tuple[str, str]] = []
    for folder, part in groups:
        # An image next to the class folders has no label: reject it rather than drop it.
        for f in sorted(folder.iterdir()):
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXTENSIONS:
                rejected.append((_rel(f, root), "no_label: image not inside a class folder"))
        for d in _subdirs(folder):
            label = label_from_folder(d.name)
            for dirpath, dirnames, filenames in os.walk(d):
                dirnames[:] = sorted(x for x in dirnames if not x.startswith("."))
                for name in sorted(filenames):
                    if name.startswith("."):
                        continue
                    f = Path(dirpath) / name
                    if label is None:
                        rejected.append(
                            (
                                _rel(f, root),
                                f"no_label: folder {d.name!r} is not a "
                                "known class (male/female/man/woman)",
                            )
                        )
                    elif f.suffix.lower() not in IMAGE_EXTENSIONS:
                        rejected.append((_rel(f, root), f"not_an_image: extension {f.suffix!r}"))
                    else:
                        rows.append(
                            {
                                "path": _rel(f, root),
                                "label": label,
                                "partition": part,
                                "identity": "",
                            }
                        )
    return Candidates("class_folders", pd.DataFrame(rows, columns=BASE_COLUMNS), rejected)


def read_layout(root: str | os.PathLike[str], layout: str = "auto") -> Candidates:
    """Read `root` with the given layout (`auto` detects it)."""
    if layout == "auto":
        layout = detect_layout(root)
    return read_celeba(root) if layout == "celeba" else read_class_folders(root)
