"""Tables too big for memory: a SQLite database in a temporary folder, and the index of the
raw folder's files the dataset layouts walk.

Validate and split work on datasets of any size with flat memory: what they must sort,
join or deduplicate across all images (the file listing, the label tables, the content
digests, the manifest in path order) goes into SQLite, which keeps a few MB in memory and
the rest on disk. SQLite's default (BINARY) order is the byte order of UTF-8, which is the
order of Python's `sorted` on strings, so a sorted query gives what `sorted` gave when
these tables were lists.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType

from genderclf.data.remote import LISTING_NAME, Pin, is_by_reference, read_listing

# Rows per executemany batch and per fetch: large enough to be fast, small enough to keep
# memory flat.
BATCH = 2048


class Scratch:
    """A SQLite database in a fresh temporary folder, removed on close.

    The folder is in the system's temporary directory (`TMPDIR`); it needs about the size
    of the manifest in free space. `cache_mib` caps SQLite's page cache, and with it the
    memory a sort may hold before it spills to the folder.
    """

    def __init__(self, prefix: str = "genderclf-", cache_mib: int = 16):
        self._dir = tempfile.TemporaryDirectory(prefix=prefix)
        self.path = Path(self._dir.name) / "scratch.db"
        self.db = sqlite3.connect(self.path)
        # A scratch database is never read after a crash: no journal, no fsync.
        for pragma in (
            "journal_mode=OFF",
            "synchronous=OFF",
            "temp_store=FILE",
            f"cache_size=-{cache_mib * 1024}",  # in KiB
        ):
            self.db.execute(f"PRAGMA {pragma}")

    def insert(self, table: str, rows: Iterable[tuple], width: int) -> None:
        """Insert rows of `width` values into `table`, in batches."""
        sql = f"INSERT INTO {table} VALUES ({','.join('?' * width)})"
        batch: list[tuple] = []
        for row in rows:
            batch.append(row)
            if len(batch) >= BATCH:
                self.db.executemany(sql, batch)
                batch.clear()
        if batch:
            self.db.executemany(sql, batch)

    def rows(self, sql: str, args: tuple = ()) -> Iterator[tuple]:
        """The rows of a query, fetched in batches (a cursor of its own)."""
        cur = self.db.execute(sql, args)
        while batch := cur.fetchmany(BATCH):
            yield from batch

    def value(self, sql: str, args: tuple = ()) -> object:
        row = self.db.execute(sql, args).fetchone()
        return None if row is None else row[0]

    def close(self) -> None:
        self.db.close()
        self._dir.cleanup()

    def __enter__(self) -> Scratch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _parent(rel: str) -> tuple[str, str]:
    """(folder, name) of a relative path; the top folder is ''."""
    folder, _, name = rel.rpartition("/")
    return folder, name


def join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


class RawTree:
    """The files and folders below the raw folder, indexed in a Scratch database.

    The layouts (`genderclf.data.layouts`) walk this index instead of the disk: it holds
    the visible files of the folder (hidden ones are skipped) and, in the by-reference
    mode, the image objects of `LISTING.csv` with their pins, so a layout reads a listed
    dataset exactly as a copied one. Paths are relative, with `/` separators; the top folder is ''.
    """

    def __init__(self, scratch: Scratch, root: str | os.PathLike[str]):
        self.scratch = scratch
        self.root = Path(root)
        db = scratch.db
        db.execute(
            "CREATE TABLE files (dir TEXT, name TEXT, size INTEGER, etag TEXT, version TEXT,"
            " PRIMARY KEY (dir, name)) WITHOUT ROWID"
        )
        db.execute("CREATE TABLE dirs (parent TEXT, name TEXT, PRIMARY KEY (parent, name))")
        scratch.insert("files", self._local_files(), 5)
        if is_by_reference(self.root):
            scratch.insert("files", self._listed_files(), 5)
        # Every folder that holds a file, up to the top (listed objects have no folders of
        # their own); real empty folders were added by the walk.
        db.execute("INSERT OR IGNORE INTO dirs SELECT DISTINCT dir, '' FROM files WHERE dir != ''")
        self._close_dirs()
        db.commit()

    def _local_files(self) -> Iterator[tuple]:
        root = self.root
        # Links to folders are followed (a dataset folder given to a layout may share its
        # images by a link; data/raw itself holds none), each real folder once.
        seen = {os.path.realpath(root)}
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            here = Path(dirpath)
            rel = here.relative_to(root).as_posix()
            rel = "" if rel == "." else rel
            keep = []
            for d in dirnames:
                real = os.path.realpath(here / d)
                if not d.startswith(".") and real not in seen:
                    seen.add(real)
                    keep.append(d)
            dirnames[:] = keep
            for d in dirnames:
                self.scratch.db.execute("INSERT OR IGNORE INTO dirs VALUES (?, ?)", (rel, d))
            for name in filenames:
                if not name.startswith("."):
                    yield rel, name, None, None, None

    def _listed_files(self) -> Iterator[tuple]:
        for key, pin in read_listing(self.root):
            folder, name = _parent(key)
            yield folder, name, pin.size, pin.etag, pin.version_id

    def _close_dirs(self) -> None:
        # Rows (dir, '') stand for "dir exists": turn each into (its parent, its name), for
        # every ancestor too, then drop the markers.
        db = self.scratch.db
        while True:
            pending = db.execute(
                "SELECT parent FROM dirs WHERE name = '' AND parent != '' LIMIT ?", (BATCH,)
            ).fetchall()
            if not pending:
                break
            for (path,) in pending:
                folder, name = _parent(path)
                db.execute("DELETE FROM dirs WHERE parent = ? AND name = ''", (path,))
                db.execute("INSERT OR IGNORE INTO dirs VALUES (?, ?)", (folder, name))
                if folder:
                    db.execute("INSERT OR IGNORE INTO dirs VALUES (?, '')", (folder,))
        db.execute("DELETE FROM dirs WHERE name = ''")

    # --- what the layouts ask --------------------------------------------------------------

    def subdirs(self, folder: str) -> list[str]:
        """The visible subfolders of `folder`, sorted by name."""
        return [
            r[0]
            for r in self.scratch.db.execute(
                "SELECT name FROM dirs WHERE parent = ? AND name NOT LIKE '.%' ORDER BY name",
                (folder,),
            )
        ]

    def files(self, folder: str) -> Iterator[str]:
        """The visible files directly in `folder`, sorted by name (streamed)."""
        for (name,) in self.scratch.rows(
            "SELECT name FROM files WHERE dir = ? AND name NOT LIKE '.%' ORDER BY name", (folder,)
        ):
            yield name

    def has_file(self, folder: str, name: str) -> bool:
        return (
            self.scratch.value("SELECT 1 FROM files WHERE dir = ? AND name = ?", (folder, name))
            is not None
        )

    def has_files(self, folder: str) -> bool:
        return (
            self.scratch.value("SELECT 1 FROM files WHERE dir = ? LIMIT 1", (folder,)) is not None
        )

    def is_dir(self, folder: str) -> bool:
        if folder == "":
            return True
        parent, name = _parent(folder)
        return (
            self.scratch.value("SELECT 1 FROM dirs WHERE parent = ? AND name = ?", (parent, name))
            is not None
        )

    def walk(self, folder: str) -> Iterator[str]:
        """Every file below `folder` in `os.walk` order (a folder's files sorted, then its
        subfolders in name order), as paths relative to the top."""
        for name in self.files(folder):
            yield join(folder, name)
        for d in self.subdirs(folder):
            yield from self.walk(join(folder, d))

    def find(self, name: str, max_depth: int = 3) -> str | None:
        """The first file called `name` in `os.walk` order, at most `max_depth` folders down."""

        def visit(folder: str, depth: int) -> str | None:
            if self.has_file(folder, name):
                return join(folder, name)
            if depth >= max_depth:
                return None
            for d in self.subdirs(folder):
                found = visit(join(folder, d), depth + 1)
                if found is not None:
                    return found
            return None

        return visit("", 0)

    def top(self) -> list[str]:
        """Names in the top folder (folders with a trailing /), for error messages."""
        dirs = [f"{d}/" for d in self.subdirs("")]
        return sorted([*dirs, *self.files("")])

    def path(self, rel: str) -> Path:
        """The local file of `rel` (label tables are always local)."""
        return self.root / rel

    def pin(self, rel: str) -> Pin | None:
        """The listed version of `rel` (by-reference mode); None for a local file."""
        folder, name = _parent(rel)
        row = self.scratch.db.execute(
            "SELECT size, etag, version FROM files WHERE dir = ? AND name = ?", (folder, name)
        ).fetchone()
        if row is None or row[0] is None:
            return None
        return Pin(int(row[0]), row[1], row[2] or "")


__all__ = ["BATCH", "LISTING_NAME", "RawTree", "Scratch", "join"]
