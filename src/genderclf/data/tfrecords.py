"""TFRecord I/O for the prepared data: sharded writer and the `tf.data` reader training uses.

A record holds one image already at the prepared data's image size: JPEG bytes, the
integer label, the source path (relative to `data/raw/`) and the variant number (0 =
original). The readers take the `PreparedData` contract (`meta.json`, read once by the
stage) or, for tools and tests, the folder itself.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Any

from genderclf.contracts import PreparedData, PreparedDataError

META_FILE = PreparedData.FILE


def shard_name(split: str, index: int, total: int) -> str:
    return f"{split}-{index:05d}-of-{total:05d}.tfrecord"


def _os_error(err: Exception, path: Path) -> OSError:
    """TensorFlow's file errors as the OSError a Python write would raise.

    `tf.io.TFRecordWriter` reports a full disk as `ResourceExhaustedError` and a refused
    write as `PermissionDeniedError` (not OSError), so callers that handle ENOSPC/EROFS
    would otherwise see a TensorFlow traceback.
    """
    import tensorflow as tf

    text = str(err)
    if isinstance(err, tf.errors.ResourceExhaustedError) or "No space left" in text:
        code = errno.ENOSPC
    elif "Read-only file system" in text:
        code = errno.EROFS
    elif isinstance(err, tf.errors.PermissionDeniedError):
        code = errno.EACCES
    else:
        code = errno.EIO
    return OSError(code, os.strerror(code), str(path))


class ShardWriter:
    """Write serialized examples into `<split>-<index>-of-<count>.tfrecord` files of fixed size.

    Raises OSError (with the errno: ENOSPC, EROFS, EACCES) when a shard cannot be written.
    """

    def __init__(self, out_dir: Path, split: str, total_records: int, shard_size: int):
        import tensorflow as tf

        self._tf = tf
        self.out_dir = out_dir
        self.split = split
        self.shard_size = shard_size
        self.num_shards = max(1, -(-total_records // shard_size))
        self.files: list[str] = []
        self._writer: Any = None
        self._count = 0

    def write(self, image: bytes, label: int, path: str, variant: int) -> None:
        tf = self._tf
        if self._count % self.shard_size == 0:
            self._open_next()
        feats = {
            "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
            "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
            "path": tf.train.Feature(bytes_list=tf.train.BytesList(value=[path.encode()])),
            "variant": tf.train.Feature(int64_list=tf.train.Int64List(value=[variant])),
        }
        ex = tf.train.Example(features=tf.train.Features(feature=feats))
        try:
            # deterministic=True: the features are a protobuf map, which the upb runtime
            # otherwise serializes in an order that changes from process to process (the
            # same records, other bytes, on every run).
            self._writer.write(ex.SerializeToString(deterministic=True))
        except tf.errors.OpError as err:
            raise _os_error(err, self.out_dir / self.files[-1]) from err
        self._count += 1

    def _open_next(self) -> None:
        self._close_current()
        name = shard_name(self.split, len(self.files), self.num_shards)
        self.files.append(name)
        try:
            self._writer = self._tf.io.TFRecordWriter(str(self.out_dir / name))
        except self._tf.errors.OpError as err:
            raise _os_error(err, self.out_dir / name) from err

    def _close_current(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()  # flushes: a full disk may only show here
            except self._tf.errors.OpError as err:
                raise _os_error(err, self.out_dir / self.files[-1]) from err
            finally:
                self._writer = None

    def close(self) -> int:
        self._close_current()
        return self._count


def make_dataset(
    prepared: PreparedData | str | os.PathLike[str],
    split: str,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    repeat: bool = False,
    with_path: bool = False,
    drop_remainder: bool = False,
    deterministic: bool = False,
    shards: list[str] | None = None,
    limit: int | None = None,
):
    """A `tf.data` pipeline over the prepared shards of one split.

    Parallel reads and decodes, optional shuffle, batching and prefetch. Yields
    `(images float32 [B,S,S,3] in 0..255, labels float32 [B])`, plus paths when
    `with_path`. Pixel scaling is left to the model, which holds its backbone's
    preprocessing (so inference needs none). A shuffled pipeline hands records over as
    soon as they are decoded (fastest, order varies) unless `deterministic`: then the
    order is a function of `seed` alone. It feeds any Keras backend (`model.fit` on JAX
    takes a `tf.data.Dataset` too).

    `shards` (file names of the split, with `limit`, the records to keep of them) reads a
    part of the split: one process's share in distributed training.
    """
    import tensorflow as tf

    data = PreparedData.of(prepared)
    info = data.split(split)
    if shards is None:
        files = [str(f) for f in data.shard_files(split)]
    else:
        files = [str(Path(data.folder or ".") / f) for f in shards]
    records = info.records if limit is None else limit
    size = data.image_size
    spec = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "path": tf.io.FixedLenFeature([], tf.string),
    }

    def parse(record):
        ex = tf.io.parse_single_example(record, spec)
        # INTEGER_ACCURATE is libjpeg's ISLOW, what PIL decodes with: `genderclf predict` and
        # the served model see the same pixels as training and evaluation. TensorFlow's
        # default (INTEGER_FAST) differs by up to 8 levels per pixel (the register stage's
        # serving check found the skew: 0.012 in P(male)).
        img = tf.io.decode_jpeg(ex["image"], channels=3, dct_method="INTEGER_ACCURATE")
        img = tf.cast(tf.reshape(img, [size, size, 3]), tf.float32)
        label = tf.cast(ex["label"], tf.float32)
        return (img, label, ex["path"]) if with_path else (img, label)

    auto = tf.data.AUTOTUNE
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(len(files), 8),
        num_parallel_calls=auto,
        deterministic=deterministic or not shuffle,
    )
    if shuffle:
        ds = ds.shuffle(min(10_000, max(1, records)), seed=seed)
    ds = ds.map(parse, num_parallel_calls=auto, deterministic=deterministic or not shuffle)
    if limit is not None:
        ds = ds.take(limit)
    # Tell Keras how many records there are, so it knows the steps per epoch up front.
    ds = ds.apply(tf.data.experimental.assert_cardinality(records))
    if repeat:
        ds = ds.repeat()
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(auto)


def reader_on_cpu_only() -> None:
    """Keep TensorFlow off the GPUs: when JAX trains on them, `tf.data` only reads on the CPU.

    Without this TensorFlow would find the CUDA libraries JAX brings and reserve most of
    the GPU memory for itself. Call it before TensorFlow first lists its devices (a no-op
    after that).
    """
    import tensorflow as tf

    with contextlib.suppress(RuntimeError):  # TensorFlow already initialised its devices
        tf.config.set_visible_devices([], "GPU")


def first_record(
    prepared: PreparedData | str | os.PathLike[str], split: str
) -> tuple[bytes, int, str]:
    """The first record of a split, undecoded: (JPEG bytes, label, source path).

    Raises:
        PreparedDataError: prepared data missing, or the split has no record.
    """
    records = read_records(prepared, split, 1)
    if not records:
        raise PreparedDataError(f"{PreparedData.of(prepared).folder}: split {split!r} is empty")
    return records[0]


def read_records(
    prepared: PreparedData | str | os.PathLike[str], split: str, n: int
) -> list[tuple[bytes, int, str]]:
    """The first `n` records of a split, undecoded: [(JPEG bytes, label, source path)].

    Raises:
        PreparedDataError: prepared data missing, or no such split.
    """
    import tensorflow as tf

    files = [str(f) for f in PreparedData.of(prepared).shard_files(split)]
    out = []
    for record in tf.data.TFRecordDataset(files).take(n):
        f = tf.train.Example.FromString(record.numpy()).features.feature
        out.append(
            (
                f["image"].bytes_list.value[0],
                int(f["label"].int64_list.value[0]),
                f["path"].bytes_list.value[0].decode(),
            )
        )
    return out
