"""Where the raw images are read from, by any process on any node: `data/raw` on a shared
filesystem, or S3 objects pinned by a listing (`data.s3.mode: reference`).

In the by-reference mode the download stage copies no image: `data/raw/LISTING.csv` holds
one row per image object (key below the prefix, size, ETag, version id when the bucket is
versioned), DVC tracks that file, and later stages read each object from S3 against its
row. With a version id the pinned version is read, whatever happened to the key since;
without one the read is conditional on the ETag (`If-Match`), so an object rewritten after
the listing is an error naming its key (`ObjectChanged`), never a silent new dataset.
Non-image files (label tables) are small: they are copied into `data/raw` as in copy mode.

Everything here is picklable, so a worker process or a Ray task gets a `RawSource` or an
`S3Object` as plain data and makes its own S3 client, with the credentials of the machine
it runs on (environment, profile or instance role): no secret travels with the work.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genderclf.config import SOURCE_NAME, GenderclfError
from genderclf.images import IMAGE_EXTENSIONS, ImageError, read_bytes

LISTING_NAME = "LISTING.csv"
LISTING_COLUMNS = ("key", "size", "etag", "version_id")


class ObjectChanged(GenderclfError, RuntimeError):
    """An S3 object no longer matches the listing that pins it."""


class RawUnreachable(GenderclfError, RuntimeError):
    """The raw data cannot be read from this process (not on this node, S3 unreachable)."""


@dataclass(frozen=True)
class Pin:
    """What identifies the listed version of one object."""

    size: int
    etag: str
    version_id: str = ""


def split_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, prefix ending in `/` or empty) of `s3://bucket/prefix`."""
    rest = uri.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return bucket, prefix


def s3_client(endpoint_url: str | None = None, retries: int = 4) -> Any:
    """A boto3 S3 client; endpoint from the argument or AWS_ENDPOINT_URL(_S3)."""
    import boto3
    from botocore.config import Config

    endpoint = (
        endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    )
    cfg = Config(retries={"max_attempts": retries + 1, "mode": "standard"})
    return boto3.client("s3", endpoint_url=endpoint, config=cfg)


@functools.cache
def _client(endpoint_url: str | None, retries: int) -> Any:
    # One client per process and endpoint: boto3 clients are thread-safe and costly to make.
    return s3_client(endpoint_url, retries)


@dataclass(frozen=True)
class S3Location:
    """A bucket and prefix (the endpoint is not a secret: it may travel with the work)."""

    bucket: str
    prefix: str
    endpoint_url: str | None = None
    retries: int = 4

    @classmethod
    def of(cls, uri: str, endpoint_url: str | None = None, retries: int = 4) -> S3Location:
        bucket, prefix = split_s3_uri(uri)
        return cls(bucket, prefix, endpoint_url, retries)

    def uri(self, rel: str = "") -> str:
        return f"s3://{self.bucket}/{self.prefix}{rel}"

    def get(self, rel: str, pin: Pin | None = None) -> bytes:
        """The bytes of the object `rel` below the prefix; with a pin, that exact version.

        Raises:
            ObjectChanged: the object is gone or differs from its pin.
            RawUnreachable: S3 cannot be read (after the client's retries).
        """
        from botocore.exceptions import BotoCoreError, ClientError

        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self.prefix + rel}
        if pin is not None and pin.version_id:
            args["VersionId"] = pin.version_id
        elif pin is not None and pin.etag:
            args["IfMatch"] = f'"{pin.etag}"'
        try:
            body = _client(self.endpoint_url, self.retries).get_object(**args)["Body"].read()
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if pin is not None and (
                status in (404, 412) or code in ("PreconditionFailed", "NoSuchKey", "NoSuchVersion")
            ):
                raise ObjectChanged(
                    self._changed(rel, pin, "it was rewritten or deleted")
                ) from None
            raise RawUnreachable(f"cannot read {self.uri(rel)}: {err}") from None
        except BotoCoreError as err:
            raise RawUnreachable(f"cannot read {self.uri(rel)}: {err}") from None
        if pin is not None and len(body) != pin.size:
            raise ObjectChanged(self._changed(rel, pin, f"it has {len(body)} bytes now"))
        return body

    def _changed(self, rel: str, pin: Pin, what: str) -> str:
        return (
            f"{self.uri(rel)} changed since data/raw/{LISTING_NAME} pinned it (ETag "
            f"{pin.etag}, {pin.size} bytes): {what}. The listing is the dataset: run "
            "`dvc repro download` (or `genderclf download`) to take the new objects as a "
            "new dataset version, or restore the object"
        )


@dataclass(frozen=True)
class S3Object:
    """A function returning one object's bytes, picklable (for worker processes and Ray
    tasks): a source `genderclf.inference.predict_images` and the drift profile take."""

    location: S3Location
    rel: str
    pin: Pin | None = None

    def __call__(self) -> bytes:
        """The object's bytes.

        Raises:
            ImageError: `unreadable` when it cannot be fetched (the image gets that reason;
                the others go on).
            ObjectChanged: pinned, and no longer what the pin says.
        """
        try:
            return self.location.get(self.rel, self.pin)
        except RawUnreachable as err:
            raise ImageError("unreadable", str(err)) from None


_SEEN_ROOTS: set[str] = set()


@dataclass(frozen=True)
class RawSource:
    """The raw dataset as workers read it: `root` (data/raw, an absolute path every node
    mounts) and, in the by-reference mode, the S3 location its listing pins."""

    root: str
    s3: S3Location | None = None

    def read(self, rel: str, pin: Pin | None = None) -> bytes:
        """The bytes of the image `rel` (a path below data/raw): the listed S3 object when
        it has a pin, else the file in data/raw.

        Raises:
            ImageError: a local file that cannot be read (its reason goes to rejected.csv).
            ObjectChanged: an S3 object differs from its pin.
            RawUnreachable: data/raw is not on this node, or S3 cannot be read.
        """
        if pin is not None and self.s3 is not None:
            return self.s3.get(rel, pin)
        self.check_root()
        return read_bytes(Path(self.root) / rel)

    def source(self, rel: str, pin: Pin | None = None) -> Path | S3Object:
        """What `genderclf.inference.open_rgb` opens for `rel`: a path or an S3Object."""
        if pin is not None and self.s3 is not None:
            return S3Object(self.s3, rel, pin)
        return Path(self.root) / rel

    def check_root(self) -> None:
        """Raises RawUnreachable when data/raw is not a folder here (once per process)."""
        if self.root in _SEEN_ROOTS:
            return
        if not Path(self.root).is_dir():
            raise RawUnreachable(
                f"{self.root} is not a folder on {socket.gethostname()}: on a cluster every "
                "node needs the workspace on a shared filesystem at the same path, or the "
                "images in S3 (data.source: s3, data.s3.mode: reference)"
            )
        _SEEN_ROOTS.add(self.root)


def raw_sources(raw: RawSource, names: list[str]) -> list[tuple[str, Path | S3Object]]:
    """(name, what to open) for a few images of the raw dataset: its files, or its listed
    S3 objects with their pins (looked up in one pass over LISTING.csv).

    Raises:
        FileNotFoundError: an image is in neither data/raw nor its listing.
    """
    pins: dict[str, Pin] = {}
    if raw.s3 is not None:
        wanted = set(names)
        pins = {k: p for k, p in read_listing(raw.root) if k in wanted}
    out: list[tuple[str, Path | S3Object]] = []
    for n in names:
        src = raw.source(n, pins.get(n))
        if isinstance(src, Path) and not src.is_file():
            raise FileNotFoundError(
                f"{src} not found (nor in a listing of S3 objects): run `dvc repro download`"
            )
        out.append((n, src))
    return out


def is_by_reference(raw_dir: str | os.PathLike[str]) -> bool:
    """Whether data/raw holds a listing of S3 objects rather than the images."""
    return (Path(raw_dir) / LISTING_NAME).is_file()


def open_raw(
    raw_dir: str | os.PathLike[str], endpoint_url: str | None = None, retries: int = 4
) -> RawSource:
    """The RawSource of a raw folder: the folder itself, or the S3 objects it lists.

    The endpoint is `endpoint_url` (data.s3.endpoint_url), else AWS_ENDPOINT_URL(_S3),
    else the one the download recorded in SOURCE.json.

    Raises:
        RawUnreachable: a listing without a SOURCE.json that says where the objects are.
    """
    raw = Path(raw_dir).resolve()
    if not is_by_reference(raw):
        return RawSource(str(raw))
    try:
        record = json.loads((raw / SOURCE_NAME).read_text(encoding="utf-8"))
        uri = record["uri"]
    except (OSError, ValueError, KeyError):
        raise RawUnreachable(
            f"{raw / LISTING_NAME} lists S3 objects but {raw / SOURCE_NAME} does not say "
            "where they are: run `dvc repro download`"
        ) from None
    endpoint = (
        endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or record.get("endpoint_url")
    )
    return RawSource(str(raw), S3Location.of(uri, endpoint, retries))


# --- the listing ------------------------------------------------------------------------------


def list_objects(client: Any, bucket: str, prefix: str) -> Iterator[tuple[str, Pin]]:
    """(key below the prefix, pin) of every current object, in key order; pins carry the
    version id when the bucket is versioned. Folder markers (`a/`) are left out."""
    try:
        versioned = client.get_bucket_versioning(Bucket=bucket).get("Status") == "Enabled"
    except Exception:  # no permission to ask: list without version ids
        versioned = False
    if versioned:
        pages = client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix)
        entries = (v for page in pages for v in page.get("Versions", []) if v.get("IsLatest"))
    else:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        entries = (o for page in pages for o in page.get("Contents", []))
    for obj in entries:
        rel = obj["Key"][len(prefix) :]
        if rel and not rel.endswith("/"):
            pin = Pin(int(obj["Size"]), obj.get("ETag", "").strip('"'), obj.get("VersionId") or "")
            yield rel, pin


def fetch_listing(location: S3Location, dest: Path) -> tuple[int, int]:
    """The by-reference download: `dest/LISTING.csv` pins every image object under the
    location; the other objects (label tables) are copied into `dest`.

    Returns:
        (images listed, other files copied)

    Raises:
        RawUnreachable: the prefix cannot be listed or an object cannot be copied.
        ValueError: a key would land outside `dest`, or names the listing itself.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    client = _client(location.endpoint_url, location.retries)
    copied = 0

    def images() -> Iterator[tuple[str, Pin]]:
        nonlocal copied
        for rel, pin in list_objects(client, location.bucket, location.prefix):
            out = dest / rel
            if not out.resolve().is_relative_to(dest.resolve()):
                raise ValueError(f"s3 key {location.prefix + rel!r} would land outside data/raw")
            if Path(rel).suffix.lower() in IMAGE_EXTENSIONS:
                yield rel, pin
                continue
            if rel in (LISTING_NAME, SOURCE_NAME):
                raise ValueError(f"{location.uri(rel)}: the source may not hold {rel} itself")
            out.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(location.bucket, location.prefix + rel, str(out))
            copied += 1

    try:
        listed = write_listing(dest / LISTING_NAME, images())
    except (BotoCoreError, ClientError) as err:
        raise RawUnreachable(f"S3 listing of {location.uri()} failed: {err}") from None
    return listed, copied


def write_listing(path: Path, rows: Iterator[tuple[str, Pin]]) -> int:
    """Write LISTING.csv from (key, pin) rows in key order; returns the number of rows."""
    n = 0
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(LISTING_COLUMNS)
        for rel, pin in rows:
            w.writerow((rel, pin.size, pin.etag, pin.version_id))
            n += 1
    return n


def read_listing(raw_dir: str | os.PathLike[str]) -> Iterator[tuple[str, Pin]]:
    """The (key, pin) rows of data/raw/LISTING.csv, streamed."""
    with open(Path(raw_dir) / LISTING_NAME, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader, None)
        for key, size, etag, version in reader:
            yield key, Pin(int(size), etag, version)
