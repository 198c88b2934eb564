"""Where a batch of new images is: a local folder or an S3 prefix, listed the same way.

`genderclf drift` reads a batch from here and the `watch` flow lists it to notice new
files. S3 goes through the boto3 client of `genderclf.data.sources` (endpoint from
`data.s3.endpoint_url` or AWS_ENDPOINT_URL, so MinIO and other S3-compatible stores work).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from genderclf.config import GenderclfError
from genderclf.images import ImageError, is_image_name


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
    if is_s3(location):
        return _list_s3(location, endpoint_url, retries)
    root = Path(location)
    if not root.is_dir():
        raise BatchError(
            f"{location}: no such folder (give a folder of images or s3://bucket/prefix)"
        )
    out, other = [], 0
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            p = Path(folder) / f
            if not is_image_name(p):
                other += 1
                continue
            try:
                st = p.stat()
            except OSError:  # vanished or unreadable: the reader reports the reason
                st = None
            out.append(
                Entry(
                    p.relative_to(root).as_posix(),
                    st.st_size if st else -1,
                    f"{st.st_mtime_ns}" if st else "",
                )
            )
    return out, other


def _list_s3(location: str, endpoint_url: str | None, retries: int) -> tuple[list[Entry], int]:
    from botocore.exceptions import BotoCoreError, ClientError

    from genderclf.data.sources import s3_client, split_s3_uri

    bucket, prefix = split_s3_uri(location)
    client = s3_client(endpoint_url, retries)
    out, other = [], 0
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix) :]
                if not rel or rel.endswith("/"):
                    continue
                if not is_image_name(rel):
                    other += 1
                    continue
                out.append(Entry(rel, int(obj.get("Size", -1)), str(obj.get("ETag", ""))))
    except (BotoCoreError, ClientError) as err:
        raise BatchError(f"{location}: cannot list the prefix: {err}") from None
    return sorted(out, key=lambda e: e.name), other


def sources(
    location: str, names: list[str], endpoint_url: str | None = None, retries: int = 3
) -> list[tuple[str, Path | Callable[[], bytes]]]:
    """(name, what to open) for each entry, as `genderclf.monitor.profile.profile` takes
    them: the local path, or a function that fetches the S3 object (one client for all; a
    failed fetch becomes that image's `unreadable`, the others go on)."""
    if not is_s3(location):
        return [(n, Path(location) / n) for n in names]
    from botocore.exceptions import BotoCoreError, ClientError

    from genderclf.data.sources import s3_client, split_s3_uri

    bucket, prefix = split_s3_uri(location)
    client = s3_client(endpoint_url, retries)

    def fetcher(name: str) -> Callable[[], bytes]:
        def fetch() -> bytes:
            try:
                return client.get_object(Bucket=bucket, Key=prefix + name)["Body"].read()
            except (BotoCoreError, ClientError) as err:
                raise ImageError(
                    "unreadable", f"cannot fetch s3://{bucket}/{prefix}{name}: {err}"
                ) from None

        return fetch

    return [(n, fetcher(n)) for n in names]
