"""The download stage: fetch a dataset from its source into `data/raw/`, atomically.

Sources (`data.source`): `sample` (offline generator), `kaggle` (official client),
`dir` (a local folder) and `s3` (boto3, any S3-compatible endpoint). Each writes into a
temporary folder that replaces `data/raw/` only once complete, then `SOURCE.json` records
where the data came from and a content checksum.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from genderclf.config import Settings, cpu_workers
from genderclf.data import sample
from genderclf.data.fsutil import (
    atomic_dir,
    clean_stale_temps,
    iter_files,
    safe_extract,
    tree_checksum,
    write_json,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

SOURCE_NAME = "SOURCE.json"


class DownloadError(RuntimeError):
    """The source could not be fetched; the message says what to fix."""


def retry(
    fn: Callable[[], T],
    *,
    attempts: int,
    backoff: float,
    what: str,
    transient: tuple[type[BaseException], ...],
) -> T:
    """Call `fn`, retrying transient errors with exponential backoff.

    Retries only where the world is flaky (network); anything else raises at once.
    """
    for i in range(attempts + 1):
        try:
            return fn()
        except transient as err:
            if i == attempts:
                raise DownloadError(f"{what} failed after {attempts + 1} attempts: {err}") from err
            delay = backoff * 2**i
            log.warning("%s failed (%s); retry %d/%d in %.1fs", what, err, i + 1, attempts, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


# --- sample -------------------------------------------------------------------------------


def fetch_sample(settings: Settings, dest: Path, progress: bool = True) -> dict[str, Any]:
    s = settings.data.sample
    sample.generate(
        dest,
        s.num_images,
        seed=settings.base.seed,
        images_per_identity=s.images_per_identity,
        male_fraction=s.male_fraction,
        cue_flip_fraction=s.cue_flip_fraction,
        workers=cpu_workers(s.workers),
        progress=progress,
    )
    return {"generator": "genderclf.data.sample", "num_images": s.num_images,
            "seed": settings.base.seed, "cue_flip_fraction": s.cue_flip_fraction}  # fmt: skip


# --- kaggle -------------------------------------------------------------------------------


def kaggle_credentials_present(env: dict[str, str] | None = None, home: Path | None = None) -> str:
    """Say where Kaggle credentials come from, without reading their values into logs.

    Raises:
        DownloadError: none are set, with exactly what to set.
    """
    env = os.environ if env is None else env
    home = Path.home() if home is None else home
    if env.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    if env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY"
    if env.get("KAGGLE_CONFIG_DIR") and (Path(env["KAGGLE_CONFIG_DIR"]) / "kaggle.json").is_file():
        return "$KAGGLE_CONFIG_DIR/kaggle.json"
    if (home / ".kaggle" / "kaggle.json").is_file():
        return "~/.kaggle/kaggle.json"
    if (home / ".kaggle" / "access_token").is_file():
        return "~/.kaggle/access_token"
    if (home / ".kaggle" / "credentials.json").is_file():  # written by `kaggle auth login`
        return "~/.kaggle/credentials.json"
    raise DownloadError(
        "No Kaggle credentials found. Set KAGGLE_USERNAME and KAGGLE_KEY in the environment, "
        "or save the API token from https://www.kaggle.com/settings (Create New Token) as "
        "~/.kaggle/kaggle.json with mode 600."
    )


def _kaggle_download(slug: str, dest: Path) -> Path:
    """The one call into the Kaggle client: download the dataset zip into `dest`."""
    # Import here: the package's top-level `import kaggle` authenticates on import.
    from kaggle.api.kaggle_api_extended import KaggleApi

    api = KaggleApi()
    try:
        api.authenticate()
    except SystemExit:  # the client prints its help and calls exit(1) when no credential works
        raise DownloadError(
            "Kaggle did not accept the credentials (KAGGLE_API_TOKEN, KAGGLE_USERNAME/KAGGLE_KEY "
            "or ~/.kaggle/kaggle.json): check them or create a new token at "
            "https://www.kaggle.com/settings"
        ) from None
    api.dataset_download_files(slug, path=str(dest), unzip=False, quiet=True, force=True)
    zips = sorted(dest.glob("*.zip"))
    if not zips:
        raise DownloadError(f"Kaggle returned no archive for {slug}")
    return zips[0]


def fetch_kaggle(settings: Settings, dest: Path) -> dict[str, Any]:
    import requests

    k = settings.data.kaggle
    cred_source = kaggle_credentials_present()
    log.info("Kaggle: downloading %s (credentials from %s)", k.slug, cred_source)
    staging = dest / ".download"
    staging.mkdir()

    def attempt() -> Path:
        for p in staging.iterdir():
            p.unlink()
        try:
            return _kaggle_download(k.slug, staging)
        except requests.exceptions.HTTPError as err:
            code = err.response.status_code if err.response is not None else 0
            if code == 429 or code >= 500:
                raise _TransientHTTP(f"HTTP {code}") from err
            if code in (401, 403):
                raise DownloadError(
                    f"Kaggle refused access to {k.slug} (HTTP {code}): check the credentials "
                    f"({cred_source}) and accept the dataset's rules on its Kaggle page"
                ) from None
            if code == 404:
                raise DownloadError(
                    f"Kaggle dataset {k.slug!r} not found (HTTP 404): check data.kaggle.slug"
                ) from None
            raise DownloadError(f"Kaggle download of {k.slug} failed: HTTP {code}") from None

    archive = retry(
        attempt, attempts=k.retries, backoff=k.backoff_seconds, what=f"Kaggle download of {k.slug}",
        transient=(requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                   requests.exceptions.ChunkedEncodingError, _TransientHTTP),
    )  # fmt: skip
    safe_extract(archive, dest)
    shutil.rmtree(staging)
    return {"slug": k.slug, "archive": archive.name}


class _TransientHTTP(Exception):
    pass


# --- dir ----------------------------------------------------------------------------------


def fetch_dir(settings: Settings, dest: Path) -> dict[str, Any]:
    src = Path(settings.data.dir.path or "").expanduser()
    if not src.is_dir():
        raise DownloadError(f"data.dir.path={str(src)!r} is not a folder: point it at the dataset")
    for p in iter_files(src):
        out = dest / p.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, out)
    return {"path": str(src.resolve())}


# --- s3 -----------------------------------------------------------------------------------


def s3_client(endpoint_url: str | None = None, retries: int = 4):
    """A boto3 S3 client; endpoint from the argument or AWS_ENDPOINT_URL(_S3)."""
    import boto3
    from botocore.config import Config

    endpoint = (
        endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    )
    cfg = Config(retries={"max_attempts": retries + 1, "mode": "standard"})
    return boto3.client("s3", endpoint_url=endpoint, config=cfg)


def split_s3_uri(uri: str) -> tuple[str, str]:
    rest = uri.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return bucket, prefix


def fetch_s3(settings: Settings, dest: Path) -> dict[str, Any]:
    from botocore.exceptions import BotoCoreError, ClientError

    s = settings.data.s3
    bucket, prefix = split_s3_uri(s.uri or "")
    client = s3_client(s.endpoint_url, s.retries)
    n = 0
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                rel = key[len(prefix) :]
                if not rel or rel.endswith("/"):
                    continue
                out = dest / rel
                if not out.resolve().is_relative_to(dest.resolve()):
                    raise DownloadError(f"s3 key {key!r} would land outside data/raw")
                out.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, key, str(out))
                n += 1
    except (BotoCoreError, ClientError) as err:
        raise DownloadError(f"S3 download of {s.uri} failed: {err}") from err
    if n == 0:
        raise DownloadError(f"{s.uri}: no objects under this prefix")
    return {"uri": s.uri, "endpoint_url": client.meta.endpoint_url}


FETCHERS: dict[str, Callable[[Settings, Path], dict[str, Any]]] = {
    "sample": fetch_sample,
    "kaggle": fetch_kaggle,
    "dir": fetch_dir,
    "s3": fetch_s3,
}


def download(
    settings: Settings, raw_dir: str | os.PathLike[str], progress: bool = True
) -> dict[str, Any]:
    """Fetch `settings.data.source` into `raw_dir`, replacing it only when complete.

    Returns:
        The SOURCE.json record (source, location, time, file count, checksum).

    Raises:
        DownloadError: the source is unreachable, empty or misconfigured.
    """
    raw_dir = Path(raw_dir)
    clean_stale_temps(raw_dir.parent, raw_dir.name)
    source = settings.data.source
    started = time.monotonic()
    with atomic_dir(raw_dir) as tmp:
        fetch = FETCHERS[source]
        details = (
            fetch_sample(settings, tmp, progress) if source == "sample" else fetch(settings, tmp)
        )
        checksum, count = tree_checksum(tmp)
        record = {
            "source": source,
            **details,
            "downloaded_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "file_count": count,
            "checksum": f"sha256:{checksum}",
        }
        write_json(tmp / SOURCE_NAME, record)
    log.info("download: %d files from %s in %.1fs", count, source, time.monotonic() - started)
    return record


def read_source(raw_dir: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(raw_dir) / SOURCE_NAME
    if not p.is_file():
        return {}
    return json.loads(p.read_text())
