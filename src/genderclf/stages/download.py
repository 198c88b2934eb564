"""The download stage: fetch `data.source` into `data/raw/`, replacing it only when complete."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from genderclf.config import Paths, Settings
from genderclf.data.sources import fetch
from genderclf.io import atomic_dir, tree_checksum, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DownloadReport:
    record: dict[str, Any]  # what SOURCE.json holds
    raw: Path
    seconds: float


def run(settings: Settings, paths: Paths, progress: bool = True) -> DownloadReport:
    """Fetch the dataset into `paths.raw` through a temporary folder; write SOURCE.json.

    SOURCE.json records the source, its location, the time, the file count, a sha256
    checksum of the content and the files refused (links leading out of the source).

    Raises:
        DownloadError: the source is unreachable, empty or misconfigured; `paths.raw`
            keeps its previous content.
        UnsafeArchiveError: the archive would write outside its folder; nothing is kept.
    """
    started = time.monotonic()
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
        }
        write_json(tmp / paths.source_file.name, record)
    seconds = time.monotonic() - started
    log.info("download: %d files from %s in %.1fs", count, settings.data.source, seconds)
    return DownloadReport(record, paths.raw, seconds)
