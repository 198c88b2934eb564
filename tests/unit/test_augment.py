"""The augment stage: splits -> sharded TFRecords at base.image_size, read back by tf.data."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests.helpers.stages import augment as run_augment

from genderclf.config import SPLITS
from genderclf.contracts import PreparedData
from genderclf.data import sample
from genderclf.data.augment import AugmentParams, augment, preview
from genderclf.data.layouts import read_layout
from genderclf.data.split import read_split, split_manifest, write_splits
from genderclf.data.tfrecords import META_FILE, PreparedDataError, make_dataset
from genderclf.images import fit_square, load_rgb
from genderclf.stages.augment import AugmentError

N_IMAGES = 40
BASE = {"split.strategy": "stratified", "split.val_fraction": 0.2, "split.test_fraction": 0.2}


@pytest.fixture(scope="module")
def data(tmp_path_factory, make_settings) -> tuple[Path, Path]:
    """A tiny raw dataset (the sample generator) and its split tables."""
    root = tmp_path_factory.mktemp("augment")
    raw = root / "raw"
    raw.mkdir()
    sample.generate(
        raw,
        N_IMAGES,
        seed=1,
        images_per_identity=2,
        male_fraction=0.42,
        cue_flip_fraction=0.03,
        workers=1,
        progress=False,
    )
    settings = make_settings(BASE)
    parts = split_manifest(read_layout(raw).rows, settings.split, settings.base.seed)
    write_splits(parts, root / "splits")
    return raw, root / "splits"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, make_settings, data) -> tuple[Path, dict, object]:
    raw, splits = data
    settings = make_settings({**BASE, "augment.copies": 2})
    out = tmp_path_factory.mktemp("prepared") / "prepared"
    meta = run_augment(settings, raw, splits, out, progress=False)
    return out, meta, settings


def _read_all(prepared_dir: Path, split: str):
    images, labels, paths = [], [], []
    for x, y, p in make_dataset(prepared_dir, split, batch_size=7, with_path=True):
        images.append(x.numpy())
        labels.append(y.numpy())
        paths.extend(s.decode() for s in p.numpy())
    return np.concatenate(images), np.concatenate(labels), paths


def test_records_read_back(prepared, data):
    out, meta, settings = prepared
    _, splits = data
    copies = settings.augment.copies
    size = settings.base.image_size
    assert PreparedData.read(out) == meta
    assert meta.image_size == size
    for s in SPLITS:
        table = read_split(splits, s)
        images, labels, paths = _read_all(out, s)
        per_image = 1 + copies if s == "train" else 1
        assert images.shape == (len(table) * per_image, size, size, 3)
        assert images.dtype == np.float32
        assert images.min() >= 0.0 and images.max() <= 255.0
        assert meta.splits[s].records == len(table) * per_image
        assert meta.splits[s].images == len(table)
        # every image, each with its own label, (1 + copies) times in train
        assert Counter(paths) == {p: per_image for p in table["path"]}
        expected = dict(zip(table["path"], table["label"], strict=True))
        assert [expected[p] for p in paths] == labels.astype(int).tolist()
        assert meta.splits[s].male == int(table["label"].sum())


def test_shards_follow_shard_size(prepared):
    out, meta, settings = prepared
    shard_size = settings.augment.shard_size
    for s in SPLITS:
        shards = meta.splits[s].shards
        assert len(shards) == -(-meta.splits[s].records // shard_size)
        assert shards == [f"{s}-{i:05d}-of-{len(shards):05d}.tfrecord" for i in range(len(shards))]
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted([META_FILE, *(f for s in SPLITS for f in meta.splits[s].shards)])


def test_variants_differ_from_the_original(prepared):
    out, _, _ = prepared
    images, _, paths = _read_all(out, "train")
    first = paths[0]
    variants = [images[i] for i, p in enumerate(paths) if p == first]
    assert len(variants) == 3
    assert not np.array_equal(variants[0], variants[1])
    assert not np.array_equal(variants[1], variants[2])


def test_val_and_test_are_resized_only(prepared, data):
    out, _, settings = prepared
    raw, _ = data
    images, _, paths = _read_all(out, "val")
    size, resize = settings.base.image_size, settings.augment.resize
    expected = [
        np.asarray(fit_square(load_rgb(str(raw / p)), size, resize), np.float32) for p in paths
    ]
    # Stored as JPEG, so not bit-exact: each record is far closer to its own resized image
    # than to any other image of the split.
    for i, img in enumerate(images):
        dist = [float(np.abs(img - e).mean()) for e in expected]
        assert int(np.argmin(dist)) == i
        assert dist[i] * 3 < min(d for j, d in enumerate(dist) if j != i)


def test_copies_zero(tmp_path, make_settings, data):
    raw, splits = data
    settings = make_settings({**BASE, "augment.copies": 0})
    meta = run_augment(settings, raw, splits, tmp_path / "prepared", progress=False)
    n_train = len(read_split(splits, "train"))
    assert meta.splits["train"].records == n_train
    assert meta.splits["train"].copies == 0
    _, _, paths = _read_all(tmp_path / "prepared", "train")
    assert len(paths) == n_train
    assert len(set(paths)) == n_train


def test_same_output_with_two_workers(tmp_path, make_settings, data, prepared):
    out, meta, _ = prepared
    raw, splits = data
    settings = make_settings({**BASE, "augment.copies": 2, "augment.workers": 2})
    meta2 = run_augment(settings, raw, splits, tmp_path / "prepared", progress=False)
    assert meta2.splits == meta.splits
    for name in meta.splits["train"].shards:
        assert (tmp_path / "prepared" / name).read_bytes() == (out / name).read_bytes()


def test_preview(tmp_path, prepared, data):
    _, _, settings = prepared
    raw, splits = data
    png = tmp_path / "reports" / "augment_preview.png"
    preview(settings, raw, read_split(splits, "train"), png)
    with Image.open(png) as im:
        assert im.format == "PNG"
        pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 10  # not a blank canvas


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.glob(".prepared.*"))


def _fail_on_nth_write(monkeypatch, n: int, err: OSError) -> list[int]:
    from genderclf.data import tfrecords

    real = tfrecords.ShardWriter.write
    calls = [0]

    def write(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise err
        return real(self, *args, **kwargs)

    monkeypatch.setattr(tfrecords.ShardWriter, "write", write)
    return calls


def test_disk_full_leaves_nothing_marked_complete(tmp_path, make_settings, data, monkeypatch):
    raw, splits = data
    settings = make_settings(BASE)
    out = tmp_path / "data" / "prepared"
    calls = _fail_on_nth_write(monkeypatch, 20, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(AugmentError, match="No space left on device"):
        run_augment(settings, raw, splits, out, progress=False)
    assert calls[0] == 20  # failed part-way, after shards were opened
    assert not out.exists()
    assert _leftovers(out.parent) == []
    with pytest.raises(PreparedDataError, match="run `dvc repro augment`"):
        PreparedData.read(out)


def test_disk_full_keeps_the_previous_prepared_data(tmp_path, make_settings, data, monkeypatch):
    raw, splits = data
    settings = make_settings(BASE)
    out = tmp_path / "prepared"
    run_augment(settings, raw, splits, out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _fail_on_nth_write(monkeypatch, 5, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(AugmentError):
        run_augment(make_settings({**BASE, "augment.copies": 3}), raw, splits, out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _leftovers(tmp_path) == []


def test_other_io_errors_are_not_disguised(tmp_path, make_settings, data, monkeypatch):
    raw, splits = data
    _fail_on_nth_write(monkeypatch, 3, OSError(errno.EIO, os.strerror(errno.EIO)))
    with pytest.raises(OSError) as info:
        run_augment(make_settings(BASE), raw, splits, tmp_path / "prepared", progress=False)
    assert not isinstance(info.value, AugmentError)
    assert info.value.errno == errno.EIO
    assert not (tmp_path / "prepared").exists()


def _blocks_writes(folder: Path) -> bool:
    probe = folder / "probe"
    try:
        probe.mkdir()
    except OSError:
        return True
    probe.rmdir()
    return False


@contextlib.contextmanager
def _read_only(folder: Path) -> Iterator[bool]:
    """Make `folder` read-only for this user: chmod, or for root (who ignores modes) the
    immutable attribute where the file system has one. Yields whether it worked."""
    folder.chmod(0o555)
    try:
        if _blocks_writes(folder):
            yield True
            return
    finally:
        folder.chmod(0o755)
    chattr = shutil.which("chattr")
    if chattr and subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode == 0:
        try:
            yield _blocks_writes(folder)
        finally:
            subprocess.run([chattr, "-i", str(folder)], check=True)
        return
    yield False


def test_read_only_folder(tmp_path, make_settings, data):
    raw, splits = data
    parent = tmp_path / "data"
    parent.mkdir()
    with _read_only(parent) as read_only:
        if not read_only:
            pytest.skip("cannot make a folder read-only here (root without chattr +i)")
        with pytest.raises(AugmentError, match="cannot write prepared data"):
            run_augment(make_settings(BASE), raw, splits, parent / "prepared", progress=False)
    assert list(parent.iterdir()) == []


def test_missing_splits(tmp_path, tiny_settings, data):
    raw, _ = data
    with pytest.raises(FileNotFoundError, match=r"train\.csv not found"):
        run_augment(tiny_settings, raw, tmp_path / "splits", tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()


def test_meta_records_the_settings(prepared):
    out, _, settings = prepared
    on_disk = json.loads((out / META_FILE).read_text())
    # speed-only keys (workers) are not recorded: they must not change the output's bytes
    assert on_disk["augment"] == settings.augment.model_dump(exclude={"workers"})
    assert on_disk["seed"] == settings.base.seed
    assert on_disk["resize"] == settings.augment.resize


# --- per-image operations ------------------------------------------------------------------


def _noise(w: int, h: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(w * h)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


@pytest.mark.parametrize("mode", ["center_crop", "stretch"])
def test_fit_square(mode):
    out = fit_square(_noise(40, 60), 32, mode)
    assert out.size == (32, 32)


def test_center_crop_keeps_the_middle():
    im = Image.new("RGB", (30, 90), (255, 0, 0))
    im.paste((0, 0, 255), (0, 30, 30, 60))  # the middle square is blue
    out = np.asarray(fit_square(im, 30, "center_crop"))
    assert (out[..., 2] == 255).all()


def test_zero_ranges_leave_the_image_alone():
    base = _noise(32, 32)
    p = AugmentParams(flip=False, rotation_deg=0, zoom=0, shift=0, brightness=0, contrast=0)
    assert np.array_equal(np.asarray(augment(base, p, np.random.default_rng(0))), np.asarray(base))


def test_flip_only_gives_the_image_or_its_mirror():
    base = _noise(32, 32)
    arr = np.asarray(base)
    p = AugmentParams(flip=True, rotation_deg=0, zoom=0, shift=0, brightness=0, contrast=0)
    outs = [np.asarray(augment(base, p, np.random.default_rng(s))) for s in range(12)]
    mirrored = [np.array_equal(o, arr[:, ::-1]) for o in outs]
    assert all(m or np.array_equal(o, arr) for m, o in zip(mirrored, outs, strict=True))
    assert any(mirrored) and not all(mirrored)


def test_augment_keeps_size_and_is_seeded():
    base = _noise(32, 32)
    p = AugmentParams(True, 10, 0.1, 0.05, 0.15, 0.15)
    a = augment(base, p, np.random.default_rng([1, 2]))
    b = augment(base, p, np.random.default_rng([1, 2]))
    assert a.size == (32, 32) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    ("mode", "fmt"), [("L", "JPEG"), ("CMYK", "JPEG"), ("P", "PNG"), ("RGBA", "PNG")]
)
def test_load_rgb_converts(tmp_path, make_image, mode, fmt):
    path = make_image(tmp_path / f"x.{fmt.lower()}", size=(20, 10), mode=mode, fmt=fmt)
    im = load_rgb(str(path))
    assert im.mode == "RGB"
    assert im.size == (20, 10)


def test_load_rgb_composites_transparency_on_white(tmp_path):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(path)
    assert set(np.asarray(load_rgb(str(path))).flatten()) == {255}


def test_load_rgb_applies_exif_orientation(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.new("RGB", (40, 20)).save(path, exif=exif)
    assert load_rgb(str(path)).size == (20, 40)
