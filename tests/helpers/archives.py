"""Archive builders for the extraction tests: zip/tar files with chosen (hostile) members."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path


def make_zip(
    path: Path, members: list[tuple[str, bytes]], symlink: tuple[str, str] | None = None
) -> Path:
    """A zip of (name, bytes) members, plus an optional symlink member (name, target)."""
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members:
            z.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink[0])
            info.external_attr = 0o120777 << 16  # S_IFLNK | 0777
            z.writestr(info, symlink[1])
    return path


def make_tar(path: Path, members: list[tuple[str, bytes] | tarfile.TarInfo]) -> Path:
    """A .tar.gz of (name, bytes) members and/or prepared TarInfo entries (links)."""
    with tarfile.open(path, "w:gz") as t:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                t.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                t.addfile(info, io.BytesIO(m[1]))
    return path


def tar_link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    """A tar symlink (or, with kind=LNKTYPE, hard link) entry."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info
