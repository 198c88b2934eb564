"""The augment stage on a full disk or a read-only folder: one clear error, and never a
prepared folder that looks complete (meta.json) without all its shards.

The file systems are real: a tmpfs of a few dozen KiB (ENOSPC comes from the kernel) and
the same remounted read-only (EROFS). Mounting needs root; where it is refused those tests
skip, and `test_writer_error_*` still covers the path with TensorFlow's own error injected.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from tests.helpers import BIN
from tests.helpers.stages import augment as run_augment

from genderclf.data.tfrecords import META_FILE
from genderclf.stages.augment import AugmentError


def _previous(prepared: Path) -> dict[str, bytes]:
    """A small 'previous complete' prepared folder; returns its files and bytes."""
    prepared.mkdir(parents=True)
    (prepared / "train-00000-of-00001.tfrecord").write_bytes(b"previous shard")
    (prepared / META_FILE).write_text(json.dumps({"previous": True}))
    return _files(prepared)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def settings(model_settings):
    return model_settings({"augment.workers": 1})


def test_disk_full_is_a_clear_error_and_keeps_the_previous_output(small_fs, sample_data, settings):
    fs = small_fs(64)  # the previous output fits; 600 new images at 32 px do not
    raw, splits = sample_data
    out = fs.path / "prepared"
    before = _previous(out)
    with pytest.raises(AugmentError, match=r"No space left on device.*dvc repro augment"):
        run_augment(settings, raw, splits, out, progress=False)
    assert _files(out) == before
    assert [p.name for p in fs.path.iterdir()] == ["prepared"]  # the temp folder is gone


def test_read_only_folder_is_a_clear_error(small_fs, sample_data, settings):
    fs = small_fs(256)
    raw, splits = sample_data
    out = fs.path / "prepared"
    before = _previous(out)
    fs.read_only()  # a real read-only mount: chmod would not stop root
    with pytest.raises(AugmentError, match=r"Read-only file system"):
        run_augment(settings, raw, splits, out, progress=False)
    assert _files(out) == before


def test_cli_on_a_full_disk_says_so_in_one_line(
    small_fs, sample_data, settings, tiny_params, tmp_path
):
    raw, splits = sample_data
    work = tmp_path / "work"
    work.mkdir()
    fs = small_fs(48, "data")
    (work / "data").symlink_to(fs.path, target_is_directory=True)
    (fs.path / "raw").symlink_to(raw, target_is_directory=True)
    (fs.path / "splits").symlink_to(splits, target_is_directory=True)
    params = yaml.safe_load(yaml.safe_dump(tiny_params))
    params["augment"]["copies"] = 0
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run(
        [str(BIN / "genderclf"), "augment", "--quiet"],
        cwd=work,
        text=True,
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "error (augment): cannot write prepared data to data/prepared: No space left" in (
        proc.stderr
    )
    assert sorted(p.name for p in fs.path.iterdir()) == ["raw", "splits"]  # nothing partial


class _FullDiskWriter:
    """Stands in for `tf.io.TFRecordWriter`: the disk fills after `limit` records."""

    written = 0

    def __init__(self, path: str, limit: int = 40):
        import tensorflow as tf

        self._tf, self.path, self.limit = tf, Path(path), limit
        self.path.write_bytes(b"")

    def write(self, record: bytes) -> None:
        if _FullDiskWriter.written >= self.limit:
            raise self._tf.errors.ResourceExhaustedError(
                None, None, f"{self.path}; No space left on device"
            )
        _FullDiskWriter.written += 1
        with open(self.path, "ab") as f:
            f.write(record)

    def close(self) -> None:
        pass


def test_writer_error_from_tensorflow_becomes_a_clear_error(
    sample_data, settings, tmp_path, monkeypatch
):
    """Without a mount: TensorFlow's ResourceExhaustedError injected into the shard writer."""
    import tensorflow as tf

    raw, splits = sample_data
    out = tmp_path / "prepared"
    before = _previous(out)
    _FullDiskWriter.written = 0
    monkeypatch.setattr(tf.io, "TFRecordWriter", _FullDiskWriter)
    with pytest.raises(AugmentError, match=r"No space left on device") as err:
        run_augment(settings, raw, splits, out, progress=False)
    assert "Traceback" not in str(err.value)
    assert _files(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]
