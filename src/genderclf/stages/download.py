"""The download stage: fetch `data.source` into `data/raw/`, replacing it only when complete."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from genderclf.config import SOURCE_NAME, Paths, Settings
from genderclf.data.sources import fetch, listing
from genderclf.io import atomic_dir, iter_files, tree_checksum, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DownloadReport:
    record: dict[str, Any]  # what SOURCE.json holds
    raw: Path
    seconds: float
    fetched: bool  # False: the source's listing had not changed, data/raw was kept as it was


def unchanged(previous: dict[str, Any] | None, current: dict[str, Any], raw: Path) -> bool:
    """Whether `raw` already holds what the source lists: same source, same listing, and
    as many files as SOURCE.json counted (a half-deleted folder is fetched again)."""
    if not previous or previous.get("listing") != current.get("listing"):
        return False
    if previous.get("source") != current.get("source"):
        return False
    files = sum(1 for p in iter_files(raw) if p != raw / SOURCE_NAME)
    return files == previous.get("file_count")


def _previous(paths: Paths) -> dict[str, Any] | None:
    try:
        return json.loads(paths.source_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # absent or unreadable: fetch


def run(
    settings: Settings, paths: Paths, progress: bool = True, force: bool = False
) -> DownloadReport:
    """Fetch the dataset into `paths.raw` through a temporary folder; write SOURCE.json.

    First the source is listed (cheap: names, sizes and times or ETags; for `sample` the
    params); when the listing equals the one SOURCE.json recorded, `paths.raw` is left
    byte for byte as it is, so DVC finds the same hash and the later stages stay cached.
    `force` fetches regardless (e.g. a new version behind the same Kaggle slug).

    SOURCE.json records the source, its location, the time, the file count, a sha256
    checksum of the content, the source's listing and the files refused (links leading
    out of the source).

    Raises:
        DownloadError: the source is unreachable, empty or misconfigured; `paths.raw`
            keeps its previous content.
        UnsafeArchiveError: the archive would write outside its folder; nothing is kept.
    """
    started = time.monotonic()
    current = {"source": settings.data.source, "listing": listing(settings)}
    previous = _previous(paths)
    if not force and unchanged(previous, current, paths.raw):
        assert previous is not None
        log.debug(  # the CLI's summary line says it
            "download: %s unchanged since %s (%s): data/raw kept",
            settings.data.source,
            previous.get("downloaded_at"),
            current["listing"]["compares"],
        )
        return DownloadReport(previous, paths.raw, time.monotonic() - started, fetched=False)
    with atomic_dir(paths.raw) as tmp:
        fetched = fetch(settings, tmp, progress)
        checksum, count = tree_checksum(tmp)
        record = {
            "source": settings.data.source,
            **fetched.details,
            "downloaded_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "file_count": count,
            "checksum": f"sha256:{checksum}",
            "refused": [asdict(r) for r in fetched.refused],
            "listing": current["listing"],
        }
        write_json(tmp / paths.source_file.name, record)
    seconds = time.monotonic() - started
    log.debug("download: %d files from %s in %.1fs", count, settings.data.source, seconds)
    return DownloadReport(record, paths.raw, seconds, fetched=True)
