"""The pure parts of the watch flow: listing a folder, and where a batch of new files is."""

from __future__ import annotations

import os

import pytest
from flows.monitor import batch_location

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
