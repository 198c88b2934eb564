"""File-system helpers shared by the stages: atomic outputs, checksums, safe extraction."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class UnsafeArchiveError(ValueError):
    """An archive member would land outside the target folder."""


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces `target` only if the block succeeds.

    A crash or exception leaves `target` as it was (the previous complete version, or
    absent) and removes the temporary folder, so readers never see a half-written output.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_stale_temps(parent: str | os.PathLike[str], name: str) -> None:
    """Remove temporary folders left by a killed run of `atomic_dir(parent/name)`."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    for p in parent.glob(f".{name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in parent.glob(f".{name}.old-*"):
        shutil.rmtree(p, ignore_errors=True)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON atomically (temp file + rename), creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def sha256_file(path: str | os.PathLike[str], bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def iter_files(root: str | os.PathLike[str]) -> Iterator[Path]:
    """Every regular file below `root`, sorted by relative path (hidden files skipped)."""
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def tree_checksum(root: str | os.PathLike[str], exclude: tuple[str, ...] = ()) -> tuple[str, int]:
    """A content checksum of a folder: sha256 over (relative path, file sha256) pairs.

    Returns:
        (hex digest, number of files)
    """
    root = Path(root)
    h = hashlib.sha256()
    n = 0
    for p in iter_files(root):
        rel = p.relative_to(root).as_posix()
        if rel in exclude:
            continue
        h.update(f"{rel}\0{sha256_file(p)}\n".encode())
        n += 1
    return h.hexdigest(), n


def _check_member(target: Path, name: str) -> Path:
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"archive member {name!r} has an absolute path")
    parts = Path(name.replace("\\", "/")).parts
    if ".." in parts:
        raise UnsafeArchiveError(f"archive member {name!r} has a '..' component")
    dest = (target / name).resolve()
    if not dest.is_relative_to(target.resolve()):
        raise UnsafeArchiveError(f"archive member {name!r} would land outside {target}")
    return dest


def safe_extract(archive: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Extract a zip or tar archive into `target`, refusing unsafe members.

    Every member is checked before anything is written: absolute paths, `..`
    components and links that point outside `target` raise UnsafeArchiveError, and
    nothing is left behind (not even `target` itself, when it did not exist before). An
    extraction that fails part-way (a corrupt member, a full disk) removes a `target` it
    created.
    """
    archive, target = Path(archive), Path(target)
    created = not target.exists()
    try:
        _extract(archive, target)
    except BaseException:
        if created:
            shutil.rmtree(target, ignore_errors=True)
        raise


def _extract(archive: Path, target: Path) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                _check_member(target, info.filename)
                # A zip symlink has the S_IFLNK bits in the high word of external_attr.
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise UnsafeArchiveError(f"archive member {info.filename!r} is a symbolic link")
            target.mkdir(parents=True, exist_ok=True)
            z.extractall(target)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            members = t.getmembers()
            for m in members:
                _check_member(target, m.name)
                if m.issym() or m.islnk():
                    link_dest = (target / Path(m.name).parent / m.linkname).resolve()
                    if m.islnk():
                        link_dest = (target / m.linkname).resolve()
                    if Path(m.linkname).is_absolute() or not link_dest.is_relative_to(
                        target.resolve()
                    ):
                        raise UnsafeArchiveError(
                            f"archive member {m.name!r} links outside the target ({m.linkname!r})"
                        )
                elif not (m.isfile() or m.isdir()):
                    raise UnsafeArchiveError(f"archive member {m.name!r} is a special file")
            target.mkdir(parents=True, exist_ok=True)
            t.extractall(target, members=members, filter="data")
    else:
        raise ValueError(f"{archive}: not a zip or tar archive")
