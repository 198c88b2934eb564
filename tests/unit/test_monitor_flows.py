"""The pure parts of the watch flow: listing a folder, where a batch of new files is, and
which locations a watch refuses."""

from __future__ import annotations

import os

import pytest
from flows.monitor import WatchLocationError, batch_location, check_location

from genderclf.monitor.batch import BatchError, list_images, sources


@pytest.mark.parametrize(
    ("location", "new", "batch"),
    [
        ("s3://b/in", ["2026-12-01/a.jpg", "2026-12-01/sub/b.jpg"], "s3://b/in/2026-12-01"),
        ("s3://b/in/", ["x/1.jpg", "x/2.jpg"], "s3://b/in/x"),
        ("/data/in", ["a.jpg", "x/b.jpg"], "/data/in"),  # spread: the whole location
        ("/data/in", ["x/1.jpg", "y/2.jpg"], "/data/in"),
        ("/data/in", ["a/b/1.jpg", "a/c/2.jpg"], "/data/in/a"),
    ],
)
def test_batch_location(location, new, batch):
    assert batch_location(location, new) == batch


def test_list_images_of_a_folder(tmp_path, make_image):
    make_image(tmp_path / "b" / "2.jpg")
    make_image(tmp_path / "a.png")
    (tmp_path / "b" / "notes.txt").write_text("x")
    entries, other = list_images(str(tmp_path))
    assert [e.name for e in entries] == ["a.png", "b/2.jpg"] and other == 1
    before = {e.name: e.stamp for e in entries}
    os.utime(tmp_path / "a.png", ns=(1, 1))
    again = {e.name: e.stamp for e in list_images(str(tmp_path))[0]}
    assert again["a.png"] != before["a.png"] and again["b/2.jpg"] == before["b/2.jpg"]
    assert sources(str(tmp_path), ["a.png"]) == [("a.png", tmp_path / "a.png")]
    with pytest.raises(BatchError, match="nowhere: no such folder"):
        list_images(str(tmp_path / "nowhere"))


@pytest.mark.parametrize(
    ("location", "why"),
    [
        ("", "no location to list"),
        ("  ", "no location to list"),
        (".", "is the workspace"),
        ("incoming/..", "is the workspace"),
        ("..", "above the workspace"),
        ("/", "above the workspace"),
        ("reports", "inside reports/"),
        ("reports/drift", "inside reports/"),
        ("data/raw", "inside data/"),
        ("models", "inside models/"),
        ("metrics", "inside metrics/"),
        ("plots", "inside plots/"),
        ("mlruns/1", "inside mlruns/"),
        (".venv", "inside .venv/"),
        (".dvc/tmp", "inside .dvc/"),
        (".git", "inside .git/"),
    ],
)
def test_a_watch_refuses_the_pipelines_own_files(location, why, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(WatchLocationError, match=why) as err:
        check_location(location, tmp_path)
    assert "\n" not in str(err.value) and "incoming/" in str(err.value)  # one line, the fix


def test_a_watch_takes_a_folder_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert check_location("incoming", tmp_path) == str(tmp_path / "incoming")
    assert check_location("incoming/2026-12-01/", tmp_path) == str(
        tmp_path / "incoming" / "2026-12-01"
    )
    assert check_location(str(tmp_path.parent / "elsewhere"), tmp_path) == str(
        tmp_path.parent / "elsewhere"
    )
    assert check_location("s3://bucket/in/", tmp_path) == "s3://bucket/in/"
    # a store kept outside the workspace: its artifacts (each check's plot) are refused too
    store = tmp_path.parent / "store"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    for where in (store, store / "mlruns" / "3"):
        with pytest.raises(WatchLocationError, match="holds the MLflow artifacts"):
            check_location(str(where), tmp_path)
    assert check_location(str(store / "new"), tmp_path) == str(store / "new")


# The real S3 protocol server (moto on loopback) and its bucket, from the sources tests.
from tests.unit.test_sources import aws_env, bucket, s3_server  # noqa: E402, F401


@pytest.mark.integration
def test_list_and_read_an_s3_prefix(s3_server, bucket, make_image, tmp_path):  # noqa: F811
    import boto3

    from genderclf.images import ImageError

    client = boto3.client("s3", endpoint_url=s3_server)
    jpg = make_image(tmp_path / "a.jpg").read_bytes()
    for key, body in {
        "in/b1/a.jpg": jpg,
        "in/b1/sub/b.jpg": jpg,
        "in/b1/readme.md": b"#",
        "other/c.jpg": jpg,
    }.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    location = f"s3://{bucket}/in"
    entries, other = list_images(location, s3_server, 0)
    assert [e.name for e in entries] == ["b1/a.jpg", "b1/sub/b.jpg"] and other == 1
    assert all(e.size == len(jpg) and e.stamp for e in entries)
    assert batch_location(location, [e.name for e in entries]) == f"{location}/b1"
    pairs = sources(location, [e.name for e in entries], s3_server, 0)
    assert [n for n, _ in pairs] == ["b1/a.jpg", "b1/sub/b.jpg"] and pairs[0][1]() == jpg
    client.delete_object(Bucket=bucket, Key="in/b1/sub/b.jpg")  # gone after the listing
    with pytest.raises(
        ImageError, match=r"cannot read s3://.*/in/b1/sub/b\.jpg: .*NoSuchKey"
    ) as err:
        pairs[1][1]()
    assert err.value.reason == "unreadable"
    with pytest.raises(BatchError, match="cannot list the prefix"):
        list_images("s3://no-such-bucket-here/x", s3_server, 0)
