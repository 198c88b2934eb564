"""Where a batch of new images is: a local folder or an S3 prefix, listed the same way.

`genderclf drift` reads a batch from here and the `watch` flow lists it to notice new
files. S3 goes through the boto3 client of `genderclf.data.sources` (endpoint from
`data.s3.endpoint_url` or AWS_ENDPOINT_URL, so MinIO and other S3-compatible stores work).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from genderclf.config import GenderclfError
from genderclf.data.remote import S3Location, S3Object
from genderclf.images import is_image_name


class BatchError(GenderclfError):
    """The batch location does not exist, cannot be listed, or holds too few images."""


@dataclass(frozen=True)
class Entry:
    """One image file of a batch: its name relative to the location, and what identifies
    this version of it (size and modification time, or the S3 ETag)."""

    name: str
    size: int
    stamp: str


def is_s3(location: str) -> bool:
    return location.startswith("s3://")


def list_images(
    location: str, endpoint_url: str | None = None, retries: int = 3
) -> tuple[list[Entry], int]:
    """The image files under `location` (recursively, sorted by name) and how many other
    files were left out.

    Raises:
        BatchError: a folder that does not exist, or an S3 prefix that cannot be listed.
    """
    left_out = [0]
    entries = list(walk_images(location, left_out, endpoint_url, retries))
    return entries, left_out[0]


def walk_images(
    location: str, left_out: list[int], endpoint_url: str | None = None, retries: int = 3
) -> Iterator[Entry]:
    """The image files under `location`, streamed (a folder in `os.walk` order with sorted
    names, an S3 prefix in key order); `left_out[0]` counts the other files.

    Raises:
        BatchError: a folder that does not exist, or an S3 prefix that cannot be listed.
    """
    if is_s3(location):
        yield from _walk_s3(location, left_out, endpoint_url, retries)
        return
    root = Path(location)
    if not root.is_dir():
        raise BatchError(
            f"{location}: no such folder (give a folder of images or s3://bucket/prefix)"
        )
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            p = Path(folder) / f
            if not is_image_name(p):
                left_out[0] += 1
                continue
            try:
                st = p.stat()
            except OSError:  # vanished or unreadable: the reader reports the reason
                st = None
            yield Entry(
                p.relative_to(root).as_posix(),
                st.st_size if st else -1,
                f"{st.st_mtime_ns}" if st else "",
            )


def _walk_s3(
    location: str, left_out: list[int], endpoint_url: str | None, retries: int
) -> Iterator[Entry]:
    from botocore.exceptions import BotoCoreError, ClientError

    from genderclf.data.remote import s3_client, split_s3_uri

    bucket, prefix = split_s3_uri(location)
    client = s3_client(endpoint_url, retries)
    try:
        # S3 lists keys in UTF-8 byte order: the order of Python's sorted() on the names.
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix) :]
                if not rel or rel.endswith("/"):
                    continue
                if not is_image_name(rel):
                    left_out[0] += 1
                    continue
                yield Entry(rel, int(obj.get("Size", -1)), str(obj.get("ETag", "")))
    except (BotoCoreError, ClientError) as err:
        raise BatchError(f"{location}: cannot list the prefix: {err}") from None


def walk_objects(
    location: str, left_out: list[int], endpoint_url: str | None = None, retries: int = 3
) -> Iterator[tuple[str, S3Object]]:
    """The image objects under the S3 prefix `location`, streamed in key order as
    (`s3://bucket/key`, an `S3Object` that fetches it); `left_out[0]` counts the others.

    Raises:
        BatchError: the prefix cannot be listed.
    """
    where = S3Location.of(location, endpoint_url, retries)
    for e in walk_images(location, left_out, endpoint_url, retries):
        yield where.uri(e.name), S3Object(where, e.name)


def sources(
    location: str, names: list[str], endpoint_url: str | None = None, retries: int = 3
) -> list[tuple[str, Path | Callable[[], bytes]]]:
    """(name, what to open) for each entry, as `genderclf.monitor.profile.profile` takes
    them: the local path, or an `S3Object` that fetches the object (picklable, so the work
    can run in other processes or on a Ray cluster; a failed fetch becomes that image's
    `unreadable`, the others go on)."""
    if not is_s3(location):
        return [(n, Path(location).resolve() / n) for n in names]
    where = S3Location.of(location, endpoint_url, retries)
    return [(n, S3Object(where, n)) for n in names]
