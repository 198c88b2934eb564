"""The validate stage's tables in parts: candidates, checks and rejects in a scratch SQLite
database, the manifest and `rejected.csv` written from it row by row.

The manifest stays a CSV file (what users and DVC already have); it is written and read
in chunks, so no stage holds it whole. Row order, columns and cell text are those the
in-memory version wrote with pandas (`to_csv(index=False)`): the same bytes for the same
dataset.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from genderclf.config import ValidateSettings
from genderclf.console import Progress
from genderclf.data.layouts import LayoutStream
from genderclf.data.remote import Pin, RawSource
from genderclf.data.scratch import Scratch
from genderclf.data.validation import ImageCheck, iter_checks
from genderclf.io import atomic_file

CHECK_COLUMNS = ["sha256", "width", "height", "mode"]
MANIFEST_TABLE = "manifest"


class ValidationTables:
    """Candidates (`cands`), image checks (`checks`), content digests (`digests`) and
    rejects (`rejected`) of one validate run, in a Scratch database."""

    def __init__(self, scratch: Scratch, stream: LayoutStream):
        self.scratch = scratch
        self.layout = stream.layout
        self.columns = list(stream.columns)
        db = scratch.db
        cells = ", ".join(f"c{i}" for i in range(len(self.columns)))
        db.execute(f"CREATE TABLE cands (seq INTEGER PRIMARY KEY, dir TEXT, name TEXT, {cells})")
        db.execute("CREATE TABLE rejected (path TEXT, reason TEXT)")
        db.execute(
            "CREATE TABLE checks (seq INTEGER PRIMARY KEY, sha256 TEXT, width INTEGER, "
            "height INTEGER, mode TEXT)"
        )
        db.execute("CREATE TABLE digests (sha256 TEXT PRIMARY KEY, path TEXT)")
        width = 3 + len(self.columns)
        sql = f"INSERT INTO cands VALUES ({','.join('?' * width)})"
        seq = 0
        for is_row, value in stream.events:
            if is_row:
                folder, _, name = value[0].rpartition("/")
                db.execute(sql, (seq, folder, name, *value))
                seq += 1
            else:
                self.reject(*value)
        self.candidates = seq

    def reject(self, path: str, reason: str) -> None:
        self.scratch.db.execute("INSERT INTO rejected VALUES (?, ?)", (path, reason))

    def _items(self) -> Iterator[tuple[str, Pin | None]]:
        # The pin of each candidate (by-reference mode) comes from the raw index.
        for path, size, etag, version in self.scratch.rows(
            "SELECT c.c0, f.size, f.etag, f.version FROM cands c "
            "LEFT JOIN files f ON f.dir = c.dir AND f.name = c.name ORDER BY c.seq"
        ):
            yield path, (None if size is None else Pin(int(size), etag, version or ""))

    def check(self, source: RawSource, cfg: ValidateSettings, progress: bool) -> None:
        """Check every candidate (in parallel, or on the cluster) and keep the first image of
        each content; the others, and the unusable ones, become rejects with their reason."""
        db = self.scratch.db
        checks = iter_checks(self._items(), source, cfg, self.candidates)
        with Progress(self.candidates, "validate", enabled=progress) as bar:
            for seq, c in enumerate(bar.wrap(checks)):
                self._keep_or_reject(db, seq, c)
        db.commit()

    def _keep_or_reject(self, db: Any, seq: int, c: ImageCheck) -> None:
        if not c.ok:
            self.reject(c.path, c.reason)
            return
        if db.execute("INSERT OR IGNORE INTO digests VALUES (?, ?)", (c.sha256, c.path)).rowcount:
            db.execute(
                "INSERT INTO checks VALUES (?, ?, ?, ?, ?)",
                (seq, c.sha256, c.width, c.height, c.mode),
            )
            return
        first = db.execute("SELECT path FROM digests WHERE sha256 = ?", (c.sha256,)).fetchone()[0]
        self.reject(c.path, f"duplicate: same content as {first}")

    # --- what the stage writes ---------------------------------------------------------------

    @property
    def usable(self) -> int:
        return int(self.scratch.value("SELECT COUNT(*) FROM checks") or 0)

    @property
    def rejects(self) -> int:
        return int(self.scratch.value("SELECT COUNT(*) FROM rejected") or 0)

    def rejected_rows(self, limit: int = -1) -> Iterator[tuple[str, str]]:
        """(path, reason) of every reject, sorted as Python sorts the pairs."""
        yield from self.scratch.rows(
            "SELECT path, reason FROM rejected ORDER BY path, reason LIMIT ?", (limit,)
        )

    def write_rejected(self, path: Path) -> None:
        with atomic_file(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(("path", "reason"))
            w.writerows(self.rejected_rows())

    def reject_reasons(self) -> dict[str, int]:
        reasons: dict[str, int] = {}
        for (reason,) in self.scratch.rows("SELECT reason FROM rejected"):
            key = reason.split(":", 1)[0]
            reasons[key] = reasons.get(key, 0) + 1
        return reasons

    def _manifest_rows(self) -> Iterator[tuple]:
        cells = ", ".join(f"c.c{i}" for i in range(len(self.columns)))
        yield from self.scratch.rows(
            f"SELECT {cells}, k.sha256, k.width, k.height, k.mode FROM cands c "
            "JOIN checks k USING (seq) ORDER BY c.seq"
        )

    def write_manifest(self, path: Path) -> None:
        """The manifest CSV, written row by row (atomically): the columns of the layout,
        then sha256, width, height and mode; an unknown attribute is an empty cell."""
        with atomic_file(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow([*self.columns, *CHECK_COLUMNS])
            w.writerows(self._manifest_rows())

    def manifest_table(self) -> str:
        """The columns the expectations check, as a table of their own (for GX, which reads
        it through SQL); committed, so another connection sees it."""
        db = self.scratch.db
        db.execute(
            f"CREATE TABLE {MANIFEST_TABLE} AS SELECT c.c0 AS path, c.c1 AS label, "
            "c.c2 AS partition, k.sha256 AS sha256 FROM cands c JOIN checks k USING (seq) "
            "ORDER BY c.seq"
        )
        db.commit()
        return MANIFEST_TABLE

    def male_fraction(self) -> float | None:
        value = self.scratch.value("SELECT AVG(c.c1) FROM cands c JOIN checks USING (seq)")
        return None if value is None else round(float(value), 6)

    def converted_modes(self) -> dict[str, int]:
        return {
            mode: int(n)
            for mode, n in self.scratch.rows(
                "SELECT mode, COUNT(*) FROM checks WHERE mode != 'RGB' GROUP BY mode"
            )
        }
