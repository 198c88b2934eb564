"""Dataset sources: fetch `data.source` into a folder (the download stage's work).

Sources: `sample` (offline generator), `kaggle` (official client), `dir` (a local folder)
and `s3` (boto3, any S3-compatible endpoint), one per entry of `genderclf.catalog.SOURCES`
(the one list of them; the settings' allowed `data.source` values come from it too). A
source `x` is a `fetch_x` and a `list_x` here; `SOURCES` at the end pairs them with the
entry, and a missing one fails at import.

Each fetcher writes into the folder it is given and returns the details `SOURCE.json`
records; files it refused to copy (links that lead out of the source) are returned too,
so that validation lists them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genderclf import catalog
from genderclf.config import GenderclfError, Settings
from genderclf.data.remote import s3_client, split_s3_uri
from genderclf.io import Refused, copy_tree, cpu_workers, retry, safe_extract

log = logging.getLogger(__name__)

__all__ = ["SOURCES", "DownloadError", "Fetched", "Source", "fetch", "listing"]


class DownloadError(GenderclfError, RuntimeError):
    """The source could not be fetched; the message says what to fix."""


@dataclass
class Fetched:
    """What a fetcher reports: details for SOURCE.json, and the files it refused."""

    details: dict[str, Any]
    refused: list[Refused] = field(default_factory=list)


# --- sample -------------------------------------------------------------------------------


def fetch_sample(settings: Settings, dest: Path, progress: bool = True) -> Fetched:
    from genderclf.data import sample

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
    return Fetched(
        {
            "generator": "genderclf.data.sample",
            "num_images": s.num_images,
            "seed": settings.base.seed,
            "cue_flip_fraction": s.cue_flip_fraction,
        }
    )


def list_sample(settings: Settings) -> list[str]:
    # Deterministic: the params and the generator's code say everything about the files.
    from genderclf.data import sample

    s = settings.data.sample
    code = hashlib.sha256(Path(sample.__file__).read_bytes()).hexdigest()
    return [
        f"seed={settings.base.seed}",
        f"num_images={s.num_images}",
        f"images_per_identity={s.images_per_identity}",
        f"male_fraction={s.male_fraction}",
        f"cue_flip_fraction={s.cue_flip_fraction}",
        f"generator=sha256:{code}",
    ]


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


def fetch_kaggle(settings: Settings, dest: Path, progress: bool = True) -> Fetched:
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

    what = f"Kaggle download of {k.slug}"
    archive = retry(
        attempt,
        attempts=k.retries,
        backoff=k.backoff_seconds,
        what=what,
        retry_on=(
            requests.exceptions.ConnectionError,
            requests.exceptions.Timeout,
            requests.exceptions.ChunkedEncodingError,
            _TransientHTTP,
        ),
        give_up=lambda err, n: DownloadError(f"{what} failed after {n} attempts: {err}"),
    )
    extracted = staging / "extracted"
    safe_extract(archive, extracted)
    # Links the archive keeps inside itself become plain files; none can lead out (the
    # extraction refused those), so `refused` lists only folder links.
    refused = copy_tree(extracted, dest, move=True)
    shutil.rmtree(staging)
    return Fetched({"slug": k.slug, "archive": archive.name}, refused)


class _TransientHTTP(Exception):
    pass


def list_kaggle(settings: Settings) -> list[str]:
    # Asking the Kaggle API for a version needs credentials and the network on every
    # `dvc repro`; the slug stands for the dataset instead (a `/<version>` suffix pins one).
    # A new version of the same slug is fetched by `genderclf download --force`.
    return [f"slug={settings.data.kaggle.slug}"]


# --- dir ----------------------------------------------------------------------------------


def fetch_dir(settings: Settings, dest: Path, progress: bool = True) -> Fetched:
    src = Path(settings.data.dir.path or "").expanduser()
    if not src.is_dir():
        raise DownloadError(f"data.dir.path={str(src)!r} is not a folder: point it at the dataset")
    refused = copy_tree(src, dest)
    for r in refused:
        log.warning("download: %s/%s not copied (%s)", src, r.path, r.reason)
    return Fetched({"path": str(src.resolve())}, refused)


def _dir_entries(src: Path) -> list[str]:
    """`path size mtime_ns` of each file `copy_tree` would copy (links: their target's)."""
    root = src.resolve()
    entries = []
    for dirpath, dirnames, filenames in os.walk(src):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and not (here / d).is_symlink()
        )
        for name in sorted(filenames):
            p = here / name
            if name.startswith("."):
                continue
            rel = p.relative_to(src).as_posix()
            if p.is_symlink():
                target = p.resolve()
                if not target.is_relative_to(root) or not target.is_file():
                    entries.append(f"{rel} refused")
                    continue
                p = target
            st = p.stat()
            entries.append(f"{rel} {st.st_size} {st.st_mtime_ns}")
    return sorted(entries)


def list_dir(settings: Settings) -> list[str]:
    src = Path(settings.data.dir.path or "").expanduser()
    if not src.is_dir():
        raise DownloadError(f"data.dir.path={str(src)!r} is not a folder: point it at the dataset")
    return [f"path={src.resolve()}", *_dir_entries(src)]


# --- s3 -----------------------------------------------------------------------------------


def fetch_s3(settings: Settings, dest: Path, progress: bool = True) -> Fetched:
    from botocore.exceptions import BotoCoreError, ClientError

    s = settings.data.s3
    if s.mode == "reference":
        return fetch_s3_reference(settings, dest)
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
    return Fetched({"uri": s.uri, "endpoint_url": client.meta.endpoint_url})


def fetch_s3_reference(settings: Settings, dest: Path) -> Fetched:
    """`data.s3.mode: reference`: data/raw gets LISTING.csv (key, size, ETag, version id of
    every image object) and copies of the other files; the images stay in S3
    (`genderclf.data.remote`)."""
    from genderclf.data.remote import RawUnreachable, S3Location, fetch_listing

    s = settings.data.s3
    where = S3Location.of(s.uri or "", s.endpoint_url, s.retries)
    try:
        images, copied = fetch_listing(where, dest)
    except (RawUnreachable, ValueError) as err:
        raise DownloadError(str(err)) from None
    if images == 0:
        raise DownloadError(f"{s.uri}: no image objects under this prefix")
    endpoint = s3_client(s.endpoint_url, s.retries).meta.endpoint_url
    log.info("download: %d S3 objects listed by reference, %d other files copied", images, copied)
    return Fetched({"uri": s.uri, "endpoint_url": endpoint, "mode": "reference", "listed": images})


def list_s3(settings: Settings) -> list[str]:
    from botocore.exceptions import BotoCoreError, ClientError

    s = settings.data.s3
    bucket, prefix = split_s3_uri(s.uri or "")
    client = s3_client(s.endpoint_url, s.retries)
    # By reference, data/raw holds other files than a copy: a switch of mode is a change.
    entries = [f"uri={s.uri}"] + (["mode=reference"] if s.mode == "reference" else [])
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix) :]
                if rel and not rel.endswith("/"):
                    entries.append(f"{rel} {obj['Size']} {obj.get('ETag', '').strip(chr(34))}")
    except (BotoCoreError, ClientError) as err:
        raise DownloadError(f"S3 download of {s.uri} failed (listing): {err}") from err
    return entries


@dataclass(frozen=True)
class Source:
    """A source of `genderclf.catalog.SOURCES` with the functions that list and fetch it."""

    spec: catalog.SourceSpec
    fetch: Callable[[Settings, Path, bool], Fetched]
    list: Callable[[Settings], list[str]]


SOURCES: dict[str, Source] = {
    name: Source(spec, globals()[f"fetch_{name}"], globals()[f"list_{name}"])
    for name, spec in catalog.SOURCES.items()
}


def fetch(settings: Settings, dest: Path, progress: bool = True) -> Fetched:
    """Fetch `settings.data.source` into the (empty, existing) folder `dest`.

    Raises:
        DownloadError: the source is unreachable, empty or misconfigured.
        UnsafeArchiveError: an archive holds a member that would land outside `dest`.
    """
    return SOURCES[settings.data.source].fetch(settings, dest, progress)


def listing(settings: Settings) -> dict[str, Any]:
    """A cheap fingerprint of what `fetch` would bring, taken without fetching anything.

    Same fingerprint, same files: the download stage then keeps `data/raw/` as it is. It
    holds no time of its own, so it is equal on every run while the source is unchanged.

    Returns:
        {"compares": what is compared, "entries": how many, "digest": "sha256:..."}

    Raises:
        DownloadError: the source is unreachable or misconfigured.
    """
    source = SOURCES[settings.data.source]
    h, n = hashlib.sha256(), 0
    for entry in source.list(settings):  # the digest of the entries joined by newlines
        h.update(f"\n{entry}".encode() if n else entry.encode())
        n += 1
    return {"compares": source.spec.compares, "entries": n, "digest": f"sha256:{h.hexdigest()}"}
