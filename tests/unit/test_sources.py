"""The download stage: each source into data/raw/ atomically, with SOURCE.json.

S3 runs against a real S3 protocol server (moto) on loopback; Kaggle runs the real
`kaggle` client against a local HTTP endpoint that speaks the Kaggle API's download call.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import socket
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from tests.helpers.archives import make_tar as _tar
from tests.helpers.archives import make_zip as _zip
from tests.helpers.archives import tar_link as _link
from tests.helpers.stages import download

from genderclf.config import SOURCE_NAME
from genderclf.data.layouts import read_layout
from genderclf.data.sources import DownloadError, kaggle_credentials_present
from genderclf.io import UnsafeArchiveError, iter_files, safe_extract, tree_checksum


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in iter_files(root)}


def _leftovers(parent: Path, name: str = "raw") -> list[str]:
    return sorted(p.name for p in parent.glob(f".{name}.*"))


def _check_source_record(raw: Path, source: str) -> dict:
    rec = json.loads((raw / SOURCE_NAME).read_text())
    assert rec == json.loads((raw / SOURCE_NAME).read_text())
    assert rec["source"] == source
    checksum, count = tree_checksum(raw, exclude=(SOURCE_NAME,))
    assert rec["file_count"] == count
    assert rec["checksum"] == f"sha256:{checksum}"
    assert datetime.fromisoformat(rec["downloaded_at"]).tzinfo is not None
    return rec


# --- sample --------------------------------------------------------------------------------


def test_sample_source(tmp_path, make_settings):
    settings = make_settings({"data.sample.num_images": 24})
    raw = tmp_path / "data" / "raw"
    rec = download(settings, raw, progress=False)
    assert rec == _check_source_record(raw, "sample")
    assert rec["file_count"] == 24 + 3  # images + attributes, partitions, identities
    assert rec["num_images"] == 24
    assert rec["seed"] == settings.base.seed
    cands = read_layout(raw)
    assert cands.layout == "celeba"
    assert len(cands.rows) == 24
    assert _leftovers(raw.parent) == []


def test_sample_source_is_reproducible(tmp_path, make_settings):
    settings = make_settings({"data.sample.num_images": 20})
    a = download(settings, tmp_path / "a", progress=False)
    b = download(settings, tmp_path / "b", progress=False)
    assert a["checksum"] == b["checksum"]


# --- dir -----------------------------------------------------------------------------------


@pytest.fixture
def source_folder(tmp_path, make_image) -> Path:
    src = tmp_path / "incoming"
    for i, folder in enumerate(["Training/male", "Training/female", "Validation/male"]):
        make_image(src / folder / f"{i}.jpg", seed=i)
    (src / ".hidden").write_text("not part of the dataset")
    return src


def test_dir_source_copies(tmp_path, make_settings, source_folder):
    before = _files(source_folder)
    settings = make_settings({"data.source": "dir", "data.dir.path": str(source_folder)})
    raw = tmp_path / "data" / "raw"
    rec = download(settings, raw)
    assert _check_source_record(raw, "dir") == rec
    assert rec["path"] == str(source_folder.resolve())
    assert rec["file_count"] == 3
    copied = _files(raw)
    copied.pop(SOURCE_NAME)
    assert copied == before  # same relative paths, same bytes; hidden files skipped
    assert not (raw / ".hidden").exists()
    assert _files(source_folder) == before  # the source is left alone
    # copies, not links: changing the copy does not touch the source
    first = raw / "Training" / "male" / "0.jpg"
    assert not first.is_symlink()
    first.write_bytes(b"changed")
    assert (source_folder / "Training" / "male" / "0.jpg").read_bytes() == before[
        "Training/male/0.jpg"
    ]


def test_the_listing_digest_is_the_joined_entries_digest(make_settings, source_folder):
    # Hashed entry by entry, not joined in memory: the digest must stay the one a workspace
    # recorded before, or every workspace would download again.
    import hashlib

    from genderclf.data.sources import SOURCES, listing

    settings = make_settings({"data.source": "dir", "data.dir.path": str(source_folder)})
    entries = list(SOURCES["dir"].list(settings))
    got = listing(settings)
    assert got["entries"] == len(entries) == 4  # the folder's path and its 3 files
    assert got["digest"] == "sha256:" + hashlib.sha256("\n".join(entries).encode()).hexdigest()


def test_dir_source_missing_folder(tmp_path, make_settings):
    settings = make_settings({"data.source": "dir", "data.dir.path": str(tmp_path / "nope")})
    raw = tmp_path / "raw"
    with pytest.raises(DownloadError, match=r"data.dir.path=.*nope.* is not a folder"):
        download(settings, raw)
    assert not raw.exists()
    assert _leftovers(tmp_path) == []


def test_links_never_lead_out_of_the_source(tmp_path, make_settings, source_folder, make_image):
    """A dataset folder with links: none is followed out of it, each refusal is listed.

    A link to a file outside (a credential), a link to a folder outside, a dangling link
    and a link inside the tree; only the last is followed (its content is copied).
    """
    secret = tmp_path / "home" / ".kaggle" / "kaggle.json"
    secret.parent.mkdir(parents=True)
    secret.write_text('{"username": "me", "key": "0123456789abcdef0123456789abcdef"}')
    outside = tmp_path / "elsewhere"
    make_image(outside / "x.jpg", seed=77)
    male = source_folder / "Training" / "male"
    (male / "creds.jpg").symlink_to(secret)
    (male / "folder").symlink_to(outside, target_is_directory=True)
    (male / "gone.jpg").symlink_to(tmp_path / "gone.jpg")
    inside = sorted(p for p in (source_folder / "Training" / "female").iterdir())[0]
    (male / "inside.jpg").symlink_to(inside)
    settings = make_settings({"data.source": "dir", "data.dir.path": str(source_folder)})
    raw = tmp_path / "data" / "raw"
    rec = download(settings, raw)
    copied = _files(raw)
    assert not any(secret.read_bytes() in b for b in copied.values())  # not in data/raw (or DVC)
    assert "Training/male/creds.jpg" not in copied and "Training/male/gone.jpg" not in copied
    assert not any(k.startswith("Training/male/folder") for k in copied)
    assert copied["Training/male/inside.jpg"] == inside.read_bytes()
    assert not any(p.is_symlink() for p in raw.rglob("*"))
    refused = {r["path"]: r["reason"] for r in rec["refused"]}
    assert set(refused) == {
        "Training/male/creds.jpg",
        "Training/male/folder",
        "Training/male/gone.jpg",
    }
    assert all(r.startswith("link_refused:") for r in refused.values())
    # and validation lists each refusal in rejected.csv with its reason (it then fails:
    # three images are too few, but the reports are written first)
    from tests.helpers.stages import validate

    from genderclf.stages.validate import ValidationFailed

    with pytest.raises(ValidationFailed, match="row_count"):
        validate(make_settings(), raw, tmp_path)
    rejected = (tmp_path / "reports" / "validation" / "rejected.csv").read_text()
    for path, reason in refused.items():
        assert f"{path},{reason}" in rejected


def test_special_file_mid_fetch_keeps_previous_raw(tmp_path, make_settings, source_folder):
    """A named pipe in the source fails the copy part-way; data/raw stays whole."""
    settings = make_settings({"data.source": "dir", "data.dir.path": str(source_folder)})
    raw = tmp_path / "raw"
    download(settings, raw)
    previous = _files(raw)
    fifo = source_folder / "Validation" / "male" / "zz-pipe.jpg"
    os.mkfifo(fifo)  # shutil refuses named pipes with SpecialFileError (an OSError)
    with pytest.raises(OSError, match="named pipe"):
        download(settings, raw)
    assert _files(raw) == previous
    assert _leftovers(tmp_path) == []


def test_stale_temp_folders_from_a_killed_run_are_removed(tmp_path, make_settings, source_folder):
    settings = make_settings({"data.source": "dir", "data.dir.path": str(source_folder)})
    parent = tmp_path / "data"
    (parent / ".raw.tmp-killed" / "half").mkdir(parents=True)
    (parent / ".raw.old-12345").mkdir()
    download(settings, parent / "raw")
    assert _leftovers(parent) == []
    assert (parent / "raw" / SOURCE_NAME).is_file()


def test_second_download_replaces_the_first(tmp_path, make_settings, source_folder, make_image):
    settings = make_settings({"data.source": "dir", "data.dir.path": str(source_folder)})
    raw = tmp_path / "raw"
    first = download(settings, raw)
    (source_folder / "Training" / "male" / "0.jpg").unlink()
    make_image(source_folder / "Training" / "female" / "new.jpg", seed=77)
    second = download(settings, raw)
    assert second["checksum"] != first["checksum"]
    assert not (raw / "Training" / "male" / "0.jpg").exists()
    assert (raw / "Training" / "female" / "new.jpg").is_file()
    assert _leftovers(tmp_path) == []


# --- s3 (real S3 protocol server on loopback) ----------------------------------------------


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """Fake credentials, and nothing from the machine's AWS config."""
    for var in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_CA_BUNDLE",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


@pytest.fixture
def bucket(s3_server, aws_env, request) -> str:
    import boto3

    name = "genderclf-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


def _put(endpoint: str, bucket: str, objects: dict[str, bytes]) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)


@pytest.mark.integration
def test_s3_source(tmp_path, make_settings, s3_server, bucket, make_celeba):
    src = tmp_path / "celeba"
    make_celeba(src, [1, 0, 1], partitions=[0, 1, 2])
    objects = {f"datasets/celeba/{k}": v for k, v in _files(src).items()}
    objects["datasets/other/not-this.txt"] = b"outside the prefix"
    objects["datasets/celeba-v2/not-this-either.txt"] = b"prefix is a folder, not a string"
    _put(s3_server, bucket, objects)
    settings = make_settings(
        {
            "data.source": "s3",
            "data.s3.uri": f"s3://{bucket}/datasets/celeba",
            "data.s3.endpoint_url": s3_server,
        }
    )
    raw = tmp_path / "raw"
    rec = download(settings, raw)
    assert _check_source_record(raw, "s3") == rec
    assert rec["uri"] == f"s3://{bucket}/datasets/celeba"
    assert rec["endpoint_url"] == s3_server
    got = _files(raw)
    got.pop(SOURCE_NAME)
    assert got == _files(src)
    assert rec["file_count"] == len(_files(src))
    assert len(read_layout(raw).rows) == 3


# --- s3 by reference (data.s3.mode: reference): a pinned listing instead of a copy ------------


def _by_reference(make_settings, bucket: str, endpoint: str, prefix: str = "celeba"):
    return make_settings(
        {
            "data.source": "s3",
            "data.s3.uri": f"s3://{bucket}/{prefix}",
            "data.s3.mode": "reference",
            "data.s3.endpoint_url": endpoint,
            "validate.min_rows": 4,
        }
    )


@pytest.mark.integration
def test_s3_by_reference_pins_the_images_and_validates_like_a_copy(
    tmp_path, make_settings, s3_server, bucket, make_celeba
):
    import hashlib

    from tests.helpers.stages import validate

    src = tmp_path / "celeba"
    make_celeba(src, [1, 0, 1, 0, 1, 0], partitions=[0, 0, 0, 1, 1, 2], identities=[1] * 6)
    _put(s3_server, bucket, {f"celeba/{k}": v for k, v in _files(src).items()})
    settings = _by_reference(make_settings, bucket, s3_server)
    raw = tmp_path / "raw"
    rec = download(settings, raw)
    assert rec["mode"] == "reference" and rec["listed"] == 6
    got = _files(raw)
    listing = got.pop("LISTING.csv").decode().splitlines()
    got.pop(SOURCE_NAME)
    # The label tables are copied; the images are only listed (key, size, ETag, version).
    assert got == {k: v for k, v in _files(src).items() if not k.endswith(".jpg")}
    images = {k: v for k, v in _files(src).items() if k.endswith(".jpg")}
    assert listing[0] == "key,size,etag,version_id"
    assert sorted(listing[1:]) == sorted(
        f"{k},{len(v)},{hashlib.md5(v).hexdigest()}," for k, v in images.items()
    )
    # The layout reads the listing as it reads a folder; validation reads the objects.
    assert read_layout(raw).rows.equals(read_layout(src).rows)
    by_ref = validate(settings, raw, tmp_path / "by_ref")
    copied = validate(make_settings({"validate.min_rows": 4}), src, tmp_path / "copied")
    assert by_ref == copied
    for name in ("data/validated/manifest.csv", "reports/validation/rejected.csv"):
        assert (tmp_path / "by_ref" / name).read_bytes() == (
            tmp_path / "copied" / name
        ).read_bytes()


@pytest.mark.integration
def test_s3_by_reference_refuses_an_object_changed_after_the_listing(
    tmp_path, make_settings, s3_server, bucket, make_celeba
):
    from tests.helpers.stages import validate

    from genderclf.data.remote import ObjectChanged

    src = tmp_path / "celeba"
    ids = make_celeba(src, [1, 0, 1, 0, 1], partitions=[0, 0, 0, 1, 2])
    _put(s3_server, bucket, {f"celeba/{k}": v for k, v in _files(src).items()})
    settings = _by_reference(make_settings, bucket, s3_server)
    raw = tmp_path / "raw"
    download(settings, raw)
    key = f"celeba/img_align_celeba/img_align_celeba/{ids[2]}"
    _put(s3_server, bucket, {key: b"other bytes, same name"})
    with pytest.raises(ObjectChanged, match=rf"s3://{bucket}/{key} changed since"):
        validate(settings, raw, tmp_path / "out")
    assert not (tmp_path / "out" / "data" / "validated" / "manifest.csv").exists()


@pytest.mark.integration
def test_s3_by_reference_reads_the_pinned_version_of_a_versioned_bucket(
    tmp_path, make_settings, s3_server, bucket
):
    import boto3

    from genderclf.data.remote import open_raw, read_listing

    client = boto3.client("s3", endpoint_url=s3_server)
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    _put(s3_server, bucket, {"celeba/male/a.jpg": b"first", "celeba/female/b.jpg": b"bee"})
    settings = _by_reference(make_settings, bucket, s3_server)
    raw = tmp_path / "raw"
    download(settings, raw)
    pins = dict(read_listing(raw))
    assert all(p.version_id for p in pins.values())
    _put(s3_server, bucket, {"celeba/male/a.jpg": b"second, longer"})
    # The listing pins the version: the old bytes, not an error and not the new bytes.
    assert open_raw(raw, s3_server).read("male/a.jpg", pins["male/a.jpg"]) == b"first"


def test_s3_by_reference_listing_differs_from_the_copy_listing(monkeypatch, make_settings):
    from genderclf.data import sources

    monkeypatch.setattr(sources, "s3_client", lambda *a: _NoObjects())
    copy = make_settings({"data.source": "s3", "data.s3.uri": "s3://b-1/p"})
    ref = make_settings(
        {"data.source": "s3", "data.s3.uri": "s3://b-1/p", "data.s3.mode": "reference"}
    )
    assert sources.list_s3(copy) == ["uri=s3://b-1/p"]  # as before: no refetch on upgrade
    assert sources.list_s3(ref) == ["uri=s3://b-1/p", "mode=reference"]


class _NoObjects:
    def get_paginator(self, name):
        class Pages:
            def paginate(self, **kw):
                return iter([{"Contents": []}])

        return Pages()


def test_raw_data_missing_on_a_node_is_one_error_naming_the_host(tmp_path):
    import socket as sock

    from genderclf.data.remote import RawSource, RawUnreachable

    with pytest.raises(RawUnreachable, match=rf"not a folder on {sock.gethostname()}"):
        RawSource(str(tmp_path / "not-here")).read("a.jpg")


@pytest.mark.integration
def test_s3_endpoint_from_environment(tmp_path, make_settings, s3_server, bucket, monkeypatch):
    _put(s3_server, bucket, {"male/a.jpg": b"a", "female/b.jpg": b"b"})
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    settings = make_settings({"data.source": "s3", "data.s3.uri": f"s3://{bucket}"})
    rec = download(settings, tmp_path / "raw")
    assert rec["endpoint_url"] == s3_server
    assert sorted(_files(tmp_path / "raw")) == [SOURCE_NAME, "female/b.jpg", "male/a.jpg"]


@pytest.mark.integration
def test_s3_empty_prefix(tmp_path, make_settings, s3_server, bucket):
    _put(s3_server, bucket, {"elsewhere/a.jpg": b"a"})
    settings = make_settings(
        {
            "data.source": "s3",
            "data.s3.uri": f"s3://{bucket}/empty/",
            "data.s3.endpoint_url": s3_server,
        }
    )
    with pytest.raises(DownloadError, match="no objects under this prefix"):
        download(settings, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.integration
def test_s3_missing_bucket(tmp_path, make_settings, s3_server, aws_env):
    settings = make_settings(
        {
            "data.source": "s3",
            "data.s3.uri": "s3://no-such-bucket-xyz/x",
            "data.s3.endpoint_url": s3_server,
        }
    )
    with pytest.raises(
        DownloadError, match=r"S3 download of s3://no-such-bucket-xyz/x failed.*NoSuchBucket"
    ):
        download(settings, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


@pytest.mark.integration
def test_s3_key_escaping_the_prefix_is_refused(tmp_path, make_settings, s3_server, bucket):
    _put(s3_server, bucket, {"p/ok.jpg": b"ok", "p/../../../escape.txt": b"evil"})
    settings = make_settings(
        {"data.source": "s3", "data.s3.uri": f"s3://{bucket}/p", "data.s3.endpoint_url": s3_server}
    )
    with pytest.raises(DownloadError, match="would land outside data/raw"):
        download(settings, tmp_path / "data" / "raw")
    assert not list(tmp_path.rglob("escape.txt"))
    assert _leftovers(tmp_path / "data") == []


@pytest.mark.integration
def test_s3_unreachable_endpoint(tmp_path, make_settings, aws_env):
    settings = make_settings(
        {
            "data.source": "s3",
            "data.s3.uri": "s3://bucket/x",
            "data.s3.endpoint_url": f"http://127.0.0.1:{_free_port()}",
        }
    )
    with pytest.raises(DownloadError, match="S3 download of s3://bucket/x failed"):
        download(settings, tmp_path / "raw")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- kaggle (real client, local endpoint) --------------------------------------------------

DOWNLOAD_CALL = "/v1/datasets.DatasetApiService/DownloadDataset"
KAGGLE_USER = "pipeline-bot"
KAGGLE_KEY = "k3y-7f2c9a1e5b-never-log-me"


class FakeKaggle:
    """Serves the Kaggle API's dataset download on loopback, as Kaggle does.

    `POST .../v1/datasets.DatasetApiService/DownloadDataset` answers with a redirect to
    the archive (Kaggle redirects to storage), or with the statuses queued in `fail`,
    as JSON error bodies in the API's format.
    """

    def __init__(self, archive: bytes):
        self.archive = archive
        self.fail: list[int] = []
        self.calls: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fake.calls.append(
                    {
                        "method": "POST",
                        "path": self.path,
                        "headers": dict(self.headers),
                        "body": body,
                    }
                )
                if not self.path.endswith(DOWNLOAD_CALL):
                    return self._json(404, {"code": 404, "message": "No such method"})
                if fake.fail:
                    code = fake.fail.pop(0)
                    return self._json(code, {"code": code, "message": f"fake error {code}"})
                req = json.loads(body)
                self.send_response(302)
                self.send_header("Location", f"/storage/{req['datasetSlug']}.zip")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):
                fake.calls.append(
                    {"method": "GET", "path": self.path, "headers": dict(self.headers)}
                )
                self.send_response(200)
                self.send_header("Content-Type", "application/zip")
                self.send_header("Content-Length", str(len(fake.archive)))
                self.end_headers()
                self.wfile.write(fake.archive)

            def _json(self, code, payload):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def api_calls(self) -> list[dict]:
        return [c for c in self.calls if c["method"] == "POST"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _zip_folder(root: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for rel, data in _files(root).items():
            z.writestr(rel, data)
    return buf.getvalue()


@pytest.fixture(scope="module")
def celeba_zip(tmp_path_factory, make_celeba) -> tuple[bytes, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("kaggle-celeba")
    make_celeba(root, [1, 0, 0, 1], partitions=[0, 0, 1, 2], identities=[1, 2, 3, 4])
    return _zip_folder(root), _files(root)


@pytest.fixture
def kaggle_env(monkeypatch, tmp_path):
    """A clean HOME and no Kaggle settings from the machine."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in list(os.environ):
        if var.startswith("KAGGLE_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return home


@pytest.fixture
def fake_kaggle(celeba_zip, kaggle_env, monkeypatch) -> Iterator[FakeKaggle]:
    # kaggle 2.x builds its client with an explicit environment (PROD, or LOCAL on
    # `--local`), so KAGGLE_API_ENVIRONMENT=TEST is not consulted; point the SDK's
    # endpoint table at the local server instead. Everything else is the real client.
    from kagglesdk import kaggle_env as kenv

    fake = FakeKaggle(celeba_zip[0])
    monkeypatch.setitem(kenv._env_to_endpoint, kenv.KaggleEnv.PROD, fake.url)
    monkeypatch.setitem(kenv._env_to_endpoint, kenv.KaggleEnv.LOCAL, fake.url)  # `--local`
    yield fake
    fake.close()


@pytest.fixture
def kaggle_settings(make_settings):
    return make_settings(
        {"data.source": "kaggle", "data.kaggle.slug": "jessicali9530/celeba-dataset"}
    )


@pytest.mark.integration
def test_kaggle_download(
    tmp_path, kaggle_settings, fake_kaggle, celeba_zip, monkeypatch, capfd, caplog
):
    monkeypatch.setenv("KAGGLE_USERNAME", KAGGLE_USER)
    monkeypatch.setenv("KAGGLE_KEY", KAGGLE_KEY)
    caplog.set_level(logging.DEBUG)
    raw = tmp_path / "data" / "raw"
    rec = download(kaggle_settings, raw, progress=False)

    calls = fake_kaggle.api_calls()
    assert len(calls) == 1
    assert calls[0]["path"].endswith(DOWNLOAD_CALL)
    body = json.loads(calls[0]["body"])
    assert body["ownerSlug"] == "jessicali9530"
    assert body["datasetSlug"] == "celeba-dataset"
    expected_auth = "Basic " + base64.b64encode(f"{KAGGLE_USER}:{KAGGLE_KEY}".encode()).decode()
    assert calls[0]["headers"]["Authorization"] == expected_auth

    assert _check_source_record(raw, "kaggle") == rec
    assert rec["slug"] == "jessicali9530/celeba-dataset"
    got = _files(raw)
    source_json = got.pop(SOURCE_NAME)
    assert got == celeba_zip[1]  # the archive's contents, extracted, nothing else
    assert not (raw / ".download").exists()
    assert _leftovers(raw.parent) == []
    assert len(read_layout(raw).rows) == 4
    assert "KAGGLE_USERNAME/KAGGLE_KEY" in caplog.text  # where the credentials came from

    out, err = capfd.readouterr()
    for text in (out, err, caplog.text, source_json.decode()):
        assert KAGGLE_KEY not in text


@pytest.mark.integration
def test_kaggle_transient_errors_are_retried(
    tmp_path, kaggle_settings, fake_kaggle, monkeypatch, caplog
):
    monkeypatch.setenv("KAGGLE_USERNAME", KAGGLE_USER)
    monkeypatch.setenv("KAGGLE_KEY", KAGGLE_KEY)
    fake_kaggle.fail = [503, 429]
    rec = download(kaggle_settings, tmp_path / "raw", progress=False)
    assert rec["file_count"] == 4 + 3
    assert len(fake_kaggle.api_calls()) == 3
    assert "retry 1/2" in caplog.text
    assert "retry 2/2" in caplog.text
    assert KAGGLE_KEY not in caplog.text


@pytest.mark.integration
def test_kaggle_gives_up_after_the_retries(tmp_path, kaggle_settings, fake_kaggle, monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", KAGGLE_USER)
    monkeypatch.setenv("KAGGLE_KEY", KAGGLE_KEY)
    fake_kaggle.fail = [503, 503, 503, 503]
    with pytest.raises(DownloadError, match="failed after 3 attempts: HTTP 503") as info:
        download(kaggle_settings, tmp_path / "raw", progress=False)
    assert KAGGLE_KEY not in str(info.value)
    assert len(fake_kaggle.api_calls()) == 3
    assert not (tmp_path / "raw").exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.integration
@pytest.mark.parametrize(
    ("code", "message"),
    [
        (404, r"not found \(HTTP 404\): check data.kaggle.slug"),
        (403, r"refused access .* \(HTTP 403\)"),
        (401, r"refused access .* \(HTTP 401\)"),
    ],
)
def test_kaggle_client_errors_are_not_retried(
    tmp_path, kaggle_settings, fake_kaggle, monkeypatch, code, message
):
    monkeypatch.setenv("KAGGLE_USERNAME", KAGGLE_USER)
    monkeypatch.setenv("KAGGLE_KEY", KAGGLE_KEY)
    fake_kaggle.fail = [code]
    with pytest.raises(DownloadError, match=message) as info:
        download(kaggle_settings, tmp_path / "raw", progress=False)
    assert KAGGLE_KEY not in str(info.value)
    assert len(fake_kaggle.api_calls()) == 1
    assert not (tmp_path / "raw").exists()


@pytest.mark.integration
def test_kaggle_unreachable(tmp_path, kaggle_settings, kaggle_env, monkeypatch):
    from kagglesdk import kaggle_env as kenv

    monkeypatch.setitem(
        kenv._env_to_endpoint, kenv.KaggleEnv.PROD, f"http://127.0.0.1:{_free_port()}"
    )
    monkeypatch.setenv("KAGGLE_USERNAME", KAGGLE_USER)
    monkeypatch.setenv("KAGGLE_KEY", KAGGLE_KEY)
    with pytest.raises(DownloadError, match="failed after 3 attempts"):
        download(kaggle_settings, tmp_path / "raw", progress=False)
    assert not (tmp_path / "raw").exists()


@pytest.mark.integration
def test_kaggle_hostile_archive_is_refused(tmp_path, kaggle_settings, fake_kaggle, monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", KAGGLE_USER)
    monkeypatch.setenv("KAGGLE_KEY", KAGGLE_KEY)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("list_attr_celeba.csv", "image_id,Male\n")
        z.writestr("../../escaped.txt", "evil")
    fake_kaggle.archive = buf.getvalue()
    with pytest.raises(UnsafeArchiveError, match=r"'\.\.' component"):
        download(kaggle_settings, tmp_path / "data" / "raw", progress=False)
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not (tmp_path / "data" / "raw").exists()
    assert _leftovers(tmp_path / "data") == []


def test_kaggle_missing_credentials(tmp_path, kaggle_settings, kaggle_env):
    with pytest.raises(DownloadError) as info:
        download(kaggle_settings, tmp_path / "raw", progress=False)
    msg = str(info.value)
    for needed in ("KAGGLE_USERNAME", "KAGGLE_KEY", "~/.kaggle/kaggle.json"):
        assert needed in msg
    assert not (tmp_path / "raw").exists()
    assert _leftovers(tmp_path) == []


def test_kaggle_credentials_sources(tmp_path):
    home = tmp_path
    assert kaggle_credentials_present({"KAGGLE_API_TOKEN": "t"}, home) == "KAGGLE_API_TOKEN"
    env = {"KAGGLE_USERNAME": "u", "KAGGLE_KEY": "k"}
    assert kaggle_credentials_present(env, home) == "KAGGLE_USERNAME/KAGGLE_KEY"
    with pytest.raises(DownloadError):  # a user name alone is not enough
        kaggle_credentials_present({"KAGGLE_USERNAME": "u"}, home)
    (home / ".kaggle").mkdir()
    (home / ".kaggle" / "credentials.json").write_text("{}")  # OAuth, `kaggle auth login`
    assert kaggle_credentials_present({}, home) == "~/.kaggle/credentials.json"
    (home / ".kaggle" / "access_token").write_text("t")
    assert kaggle_credentials_present({}, home) == "~/.kaggle/access_token"
    (home / ".kaggle" / "kaggle.json").write_text('{"username": "u", "key": "k"}')
    assert kaggle_credentials_present({}, home) == "~/.kaggle/kaggle.json"
    elsewhere = tmp_path / "secrets"
    elsewhere.mkdir()
    (elsewhere / "kaggle.json").write_text('{"username": "u", "key": "k"}')
    found = kaggle_credentials_present({"KAGGLE_CONFIG_DIR": str(elsewhere)}, tmp_path / "empty")
    assert found == "$KAGGLE_CONFIG_DIR/kaggle.json"


# --- safe_extract --------------------------------------------------------------------------


GOOD = [("data/a.txt", b"a"), ("data/sub/b.txt", b"b")]


def test_safe_extract_zip_and_tar(tmp_path):
    for archive in (
        _zip(tmp_path / "ok.zip", GOOD),
        _tar(tmp_path / "ok.tar.gz", [*GOOD, _link("data/link", "a.txt")]),
    ):
        target = tmp_path / f"out-{archive.name}"
        safe_extract(archive, target)
        assert (target / "data" / "a.txt").read_bytes() == b"a"
        assert (target / "data" / "sub" / "b.txt").read_bytes() == b"b"
    assert (tmp_path / "out-ok.tar.gz" / "data" / "link").read_bytes() == b"a"  # inside: fine


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(
            lambda p: _zip(p / "abs.zip", [*GOOD, ("/tmp/evil.txt", b"x")]),
            "absolute path",
            id="zip-absolute",
        ),
        pytest.param(
            lambda p: _zip(p / "dots.zip", [*GOOD, ("../evil.txt", b"x")]),
            "'..' component",
            id="zip-dotdot",
        ),
        pytest.param(
            lambda p: _zip(p / "deep.zip", [*GOOD, ("data/../../evil.txt", b"x")]),
            "'..' component",
            id="zip-nested-dotdot",
        ),
        pytest.param(
            lambda p: _zip(p / "link.zip", GOOD, symlink=("data/evil", "/etc/passwd")),
            "symbolic link",
            id="zip-symlink",
        ),
        pytest.param(
            lambda p: _tar(p / "abs.tar", [*GOOD, ("/tmp/evil.txt", b"x")]),
            "absolute path",
            id="tar-absolute",
        ),
        pytest.param(
            lambda p: _tar(p / "dots.tar", [*GOOD, ("../evil.txt", b"x")]),
            "'..' component",
            id="tar-dotdot",
        ),
        pytest.param(
            lambda p: _tar(p / "sym.tar", [*GOOD, _link("data/evil", "/etc/passwd")]),
            "links outside",
            id="tar-symlink-absolute",
        ),
        pytest.param(
            lambda p: _tar(p / "symrel.tar", [*GOOD, _link("data/evil", "../../outside")]),
            "links outside",
            id="tar-symlink-relative",
        ),
        pytest.param(
            lambda p: _tar(p / "hard.tar", [*GOOD, _link("data/evil", "../x", tarfile.LNKTYPE)]),
            "links outside",
            id="tar-hardlink",
        ),
        pytest.param(
            lambda p: _tar(p / "fifo.tar", [*GOOD, _link("data/fifo", "", tarfile.FIFOTYPE)]),
            "special file",
            id="tar-fifo",
        ),
    ],
)
def test_safe_extract_refuses_unsafe_members_and_writes_nothing(tmp_path, make, message):
    archive = make(tmp_path)
    target = tmp_path / "target"
    with pytest.raises(UnsafeArchiveError, match=message):
        safe_extract(archive, target)
    assert list(target.rglob("*")) == []  # not even the good members before the bad one
    assert not (tmp_path / "evil.txt").exists()


def test_safe_extract_not_an_archive(tmp_path):
    p = tmp_path / "data.bin"
    p.write_bytes(b"neither zip nor tar")
    with pytest.raises(ValueError, match="not a zip or tar archive"):
        safe_extract(p, tmp_path / "out")


@pytest.mark.integration
def test_kaggle_rejected_token(tmp_path, kaggle_settings, fake_kaggle, monkeypatch, capfd):
    monkeypatch.setenv("KAGGLE_API_TOKEN", "expired-token-0123456789")
    with pytest.raises(DownloadError, match="KAGGLE_API_TOKEN"):
        download(kaggle_settings, tmp_path / "raw", progress=False)
    assert not (tmp_path / "raw").exists()
    out, err = capfd.readouterr()
    assert "expired-token-0123456789" not in out + err


# --- noticing a changed source (the listing in SOURCE.json) --------------------------------


def _run_download(settings, raw: Path, force: bool = False):
    from genderclf.config import Paths
    from genderclf.stages import download as stage

    return stage.run(settings, Paths(raw=raw), progress=False, force=force)


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and mtime: "left alone" means neither changed."""
    return {
        p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


def test_unchanged_dir_source_leaves_raw_alone(tmp_path, make_settings, source_folder, make_image):
    settings = make_settings({"data.source": "dir", "data.dir.path": str(source_folder)})
    raw = tmp_path / "raw"
    first = _run_download(settings, raw)
    assert first.fetched
    assert first.record["listing"]["compares"] == "path, size, mtime"
    before = _snapshot(raw)
    again = _run_download(settings, raw)
    assert not again.fetched
    assert again.record == first.record
    assert _snapshot(raw) == before  # not rewritten: same bytes, same times

    # a new file is noticed
    make_image(source_folder / "Training" / "female" / "new.jpg", seed=50)
    added = _run_download(settings, raw)
    assert added.fetched and (raw / "Training" / "female" / "new.jpg").is_file()
    assert added.record["listing"] != first.record["listing"]
    # the same name with other bytes (and the same size) is noticed
    target = source_folder / "Training" / "male" / "0.jpg"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0xFF
    target.write_bytes(bytes(data))
    changed = _run_download(settings, raw)
    assert changed.fetched
    assert (raw / "Training" / "male" / "0.jpg").read_bytes() == bytes(data)
    assert changed.record["checksum"] != added.record["checksum"]
    # a deleted file in data/raw (file count off) is fetched again; so is --force
    (raw / "Training" / "female" / "new.jpg").unlink()
    assert _run_download(settings, raw).fetched
    assert (raw / "Training" / "female" / "new.jpg").is_file()
    assert _run_download(settings, raw, force=True).fetched
    assert not _run_download(settings, raw).fetched


def test_sample_listing_is_the_params(tmp_path, make_settings):
    settings = make_settings({"data.sample.num_images": 20})
    raw = tmp_path / "raw"
    assert _run_download(settings, raw).fetched
    assert not _run_download(settings, raw).fetched
    more = make_settings({"data.sample.num_images": 21})
    assert _run_download(more, raw).fetched
    assert len(read_layout(raw).rows) == 21


@pytest.mark.integration
def test_s3_listing_notices_new_and_changed_objects(tmp_path, make_settings, s3_server, bucket):
    _put(s3_server, bucket, {"d/male/a.jpg": b"a", "d/female/b.jpg": b"b"})
    settings = make_settings(
        {"data.source": "s3", "data.s3.uri": f"s3://{bucket}/d", "data.s3.endpoint_url": s3_server}
    )
    raw = tmp_path / "raw"
    first = _run_download(settings, raw)
    assert first.fetched and first.record["listing"]["compares"] == "key, size, ETag"
    before = _snapshot(raw)
    assert not _run_download(settings, raw).fetched
    assert _snapshot(raw) == before
    _put(s3_server, bucket, {"d/female/b.jpg": b"B"})  # same key, same size, other bytes
    assert _run_download(settings, raw).fetched
    assert (raw / "female" / "b.jpg").read_bytes() == b"B"
    _put(s3_server, bucket, {"d/male/c.jpg": b"c"})
    assert _run_download(settings, raw).fetched
    assert (raw / "male" / "c.jpg").read_bytes() == b"c"
    assert not _run_download(settings, raw).fetched


def test_unreadable_source_json_means_fetch(tmp_path, make_settings, source_folder):
    settings = make_settings({"data.source": "dir", "data.dir.path": str(source_folder)})
    raw = tmp_path / "raw"
    _run_download(settings, raw)
    (raw / SOURCE_NAME).write_text("{not json")
    assert _run_download(settings, raw).fetched
    assert json.loads((raw / SOURCE_NAME).read_text())["listing"]
