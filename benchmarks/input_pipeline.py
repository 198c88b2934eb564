"""Training input pipeline throughput at 224x224: the notebook baseline vs this project's.

One run, one set of images (the train split of a sample-generator dataset: 178x218 JPEGs
in the Kaggle CelebA layout), batches of 32, every variant measured side by side and
repeated `--rounds` times in turn (the best round is reported: the cores are shared):

  (a) keras_idg      Keras' legacy `ImageDataGenerator.flow_from_dataframe` with flip,
                     rotation and zoom (what notebook gender classifiers use): PIL decode
                     + resize, then a SciPy affine per image, in one process.
  (b) project_epoch  What a training epoch of this project pays for: `make_dataset` (the
                     `tf.data` reader train.py uses) over the prepared TFRecords, which hold
                     each image already at 224 px plus `augment.copies` variants made once
                     by the augment stage (flip, rotation, zoom, shift, brightness and
                     contrast fused into one affine warp per variant). Read, parse, JPEG
                     decode, shuffle, batch. Counted in records (originals + variants).
  (b') augment_stage The one-off cost behind (b): `run_augment` (decode, resize, warp,
                     JPEG encode, TFRecord write; worker processes on all cores), in source
                     images/s, and (b) amortised over the epochs params.yaml trains for.
  (b'') fused_tfdata Augmentation fresh every epoch on the CPU, vectorised: `tf.data`
                     decode + resize, then per batch one projective transform of all images
                     at once (each with its own fused flip/rotation/zoom/shift matrix) and
                     vectorised brightness/contrast.
  (b''') keras_layers_tfdata  Keras RandomFlip/RandomRotation/RandomZoom inside `tf.data`
                     (the approach the issue measured at about 194 images/s).
  (c) decode_resize  `tf.data` read + JPEG decode + resize to 224 only: the ceiling.
  (b1) project_epoch_1_thread  (b) on a private pool of one thread: the reader's images/s
                     per CPU core, and from it the cores a GPU worker needs to feed
                     `--feed` images/s (default 5,000).

Augmenting on the accelerator instead (inside the model) is measured by
benchmarks/train_throughput.py (`--augment keras|fused`).

    uv run python benchmarks/input_pipeline.py                    # 3,000 sample images
    uv run python benchmarks/input_pipeline.py --num-images 5000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
BATCH = 32
SIZE = 224


def prepare(work: Path, num_images: int, copies: int) -> None:
    """A sample dataset with splits in `work` (the real stage commands, params from the repo)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["sample"]["num_images"] = num_images
    params["base"]["image_size"] = SIZE
    params["augment"]["copies"] = copies
    params["validate"]["min_rows"] = min(params["validate"]["min_rows"], num_images)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    exe = str(Path(sys.executable).parent / "genderclf")
    for stage in ("download", "validate", "split"):
        args = [exe, stage] + (["-q"] if stage != "split" else [])
        out = subprocess.run(args, cwd=work, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{stage} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")


def time_augment_stage(work: Path) -> tuple[float, Any]:
    """Run the augment stage's function in-process (no CLI start-up); return (seconds, the
    PreparedData it wrote)."""
    from genderclf.config import PATHS, load_settings
    from genderclf.stages import augment

    settings = load_settings(work / "params.yaml")
    paths = PATHS.under(work)
    shutil.rmtree(paths.prepared, ignore_errors=True)
    t = time.perf_counter()
    meta = augment.run(settings, paths, progress=False).data
    return time.perf_counter() - t, meta


def _rate(batches, n_images: int) -> float:
    """Images/s over `n_images` after one untimed batch (pipeline start-up excluded)."""
    it = iter(batches)
    next(it)
    seen, t = 0, time.perf_counter()
    while seen < n_images:
        seen += len(next(it)[1])
    return seen / (time.perf_counter() - t)


def keras_idg(raw: Path, df, n: int) -> float:
    try:
        from keras.preprocessing.image import ImageDataGenerator
    except ImportError:  # Keras 3 keeps it only under the tf.keras (legacy) namespace
        from keras._tf_keras.keras.preprocessing.image import ImageDataGenerator

    gen = ImageDataGenerator(horizontal_flip=True, rotation_range=10, zoom_range=0.1)
    it = gen.flow_from_dataframe(
        df.assign(label=df["label"].astype(str)),
        directory=str(raw),
        x_col="path",
        y_col="label",
        target_size=(SIZE, SIZE),
        class_mode="binary",
        batch_size=BATCH,
        shuffle=True,
        seed=0,
    )

    def batches():
        while True:
            yield next(it)

    return _rate(batches(), n)


def project_epoch(prepared: Path, n: int, threads: int | None = None) -> float:
    """The train stage's reader; with `threads`, on a private pool of that many threads."""
    import tensorflow as tf

    from genderclf.data.tfrecords import make_dataset

    ds = make_dataset(prepared, "train", BATCH, shuffle=True, seed=0, repeat=True)
    if threads:
        options = tf.data.Options()
        options.threading.private_threadpool_size = threads
        options.threading.max_intra_op_parallelism = 1
        ds = ds.with_options(options)
    return _rate(ds.as_numpy_iterator(), n)


def _decoded(raw: Path, df):
    """`tf.data` of (float32 224x224 image, label): read, decode, resize; parallel."""
    import tensorflow as tf

    files = [str(raw / p) for p in df["path"]]
    labels = df["label"].to_numpy("float32")

    def load(path, label):
        img = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        return tf.image.resize(img, (SIZE, SIZE)), label

    ds = tf.data.Dataset.from_tensor_slices((files, labels)).shuffle(len(files), seed=0)
    return ds.repeat().map(load, num_parallel_calls=tf.data.AUTOTUNE)


def decode_resize(raw: Path, df, n: int) -> float:
    import tensorflow as tf

    ds = _decoded(raw, df).batch(BATCH).prefetch(tf.data.AUTOTUNE)
    return _rate(ds.as_numpy_iterator(), n)


def fused_tfdata(raw: Path, df, n: int, aug: dict) -> float:
    import tensorflow as tf

    rot = math.radians(aug["rotation_deg"])

    def augment(images, labels):
        b = tf.shape(images)[0]
        u = tf.random.uniform((7, b))
        theta = (2 * u[0] - 1) * rot
        scale = 1 + (2 * u[1] - 1) * aug["zoom"]
        tx, ty = [(2 * u[i] - 1) * aug["shift"] * SIZE for i in (2, 3)]
        flip = tf.where(u[4] < 0.5, -1.0, 1.0) if aug["flip"] else tf.ones_like(u[4])
        cos, sin = tf.cos(theta), tf.sin(theta)
        # output -> input: in = C + F R (out - C - T) / scale, as data/augment.py random_affine
        a0, a1, b0, b1 = flip * cos / scale, flip * sin / scale, -sin / scale, cos / scale
        c = (SIZE - 1) / 2
        a2 = c - a0 * (c + tx) - a1 * (c + ty)
        b2 = c - b0 * (c + tx) - b1 * (c + ty)
        zero = tf.zeros_like(a0)
        m = tf.stack([a0, a1, a2, b0, b1, b2, zero, zero], axis=1)
        x = tf.raw_ops.ImageProjectiveTransformV3(
            images=images,
            transforms=m,
            output_shape=[SIZE, SIZE],
            fill_value=0.0,
            interpolation="BILINEAR",
            fill_mode="REFLECT",
        )
        con = tf.reshape(1 + (2 * u[5] - 1) * aug["contrast"], (-1, 1, 1, 1))
        bri = tf.reshape(1 + (2 * u[6] - 1) * aug["brightness"], (-1, 1, 1, 1))
        mean = tf.reduce_mean(x, axis=(1, 2), keepdims=True)
        return tf.clip_by_value(((x - mean) * con + mean) * bri, 0.0, 255.0), labels

    auto = tf.data.AUTOTUNE
    ds = _decoded(raw, df).batch(BATCH).map(augment, num_parallel_calls=auto).prefetch(auto)
    return _rate(ds.as_numpy_iterator(), n)


def keras_layers_tfdata(raw: Path, df, n: int, aug: dict) -> float:
    import keras
    import tensorflow as tf

    layers = keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal"),
            keras.layers.RandomRotation(aug["rotation_deg"] / 360, fill_mode="reflect"),
            keras.layers.RandomZoom(aug["zoom"], fill_mode="reflect"),
        ]
    )
    auto = tf.data.AUTOTUNE
    ds = _decoded(raw, df).batch(BATCH)
    ds = ds.map(lambda x, y: (layers(x, training=True), y), num_parallel_calls=auto)
    return _rate(ds.prefetch(auto).as_numpy_iterator(), n)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--num-images", type=int, default=3000, help="sample dataset size")
    ap.add_argument("--copies", type=int, default=1, help="augment.copies for (b)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--keras-layers-images",
        type=int,
        default=1024,
        help="images timed for the slow Keras-layers variant",
    )
    ap.add_argument("--keep", action="store_true", help="keep the working folder")
    ap.add_argument(
        "--feed",
        type=float,
        default=5000.0,
        help="images/s a GPU worker must be fed (for the cores estimate)",
    )
    ap.add_argument("--variants", nargs="+", help="only these variants (prefix, e.g. b c)")
    args = ap.parse_args()

    import pandas as pd

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    work = Path(tempfile.mkdtemp(prefix="input-pipeline-"))
    try:
        print(f"preparing {args.num_images} sample images in {work} ...", flush=True)
        prepare(work, args.num_images, args.copies)
        raw = work / "data" / "raw"
        df = pd.read_csv(work / "data" / "splits" / "train.csv")[["path", "label"]]
        params = yaml.safe_load((work / "params.yaml").read_text())
        aug = params["augment"]
        epochs = params["train"]["epochs_head"] + params["train"]["epochs_finetune"]
        n = len(df)
        n_records = n * (1 + args.copies)
        cores = len(os.sched_getaffinity(0))
        print(
            f"train split: {n} source images, {n_records} records with copies={args.copies}; "
            f"{cores} cores; load average {os.getloadavg()[0]:.2f}",
            flush=True,
        )

        variants = {
            "a keras_idg": lambda: keras_idg(raw, df, n),
            "b project_epoch": lambda: project_epoch(work / "data" / "prepared", n_records),
            "b1 project_epoch_1_thread": lambda: project_epoch(
                work / "data" / "prepared", min(n_records, 2048), threads=1
            ),
            "b'' fused_tfdata": lambda: fused_tfdata(raw, df, n, aug),
            "b''' keras_layers_tfdata": lambda: keras_layers_tfdata(
                raw, df, min(n, args.keras_layers_images), aug
            ),
            "c decode_resize": lambda: decode_resize(raw, df, n),
        }
        if args.variants:
            keep = {"a", "b", "c", *args.variants}  # the ratios below need a, b and c
            variants = {k: v for k, v in variants.items() if k.split()[0] in keep}
        rates: dict[str, list[float]] = {k: [] for k in variants}
        stage_s: list[float] = []
        for r in range(args.rounds):
            secs, meta = time_augment_stage(work)  # first round also writes (b)'s input
            stage_s.append(secs)
            print(
                f"round {r + 1}: augment stage {n / secs:.0f} source img/s "
                f"({secs:.1f}s, load {os.getloadavg()[0]:.2f})",
                flush=True,
            )
            for name, fn in variants.items():
                rates[name].append(fn())
                print(
                    f"round {r + 1}: {name:<26} {rates[name][-1]:7.0f} img/s "
                    f"(load {os.getloadavg()[0]:.2f})",
                    flush=True,
                )
        assert meta.split("train").records == n_records

        best = {k: max(v) for k, v in rates.items()}
        prep = min(stage_s)
        # An epoch streams n_records; the one-off augment stage is shared by `epochs` epochs.
        amortised = n_records / (n_records / best["b project_epoch"] + prep / epochs)
        a, b, c = best["a keras_idg"], best["b project_epoch"], best["c decode_resize"]
        print(f"\n{'variant':<28}{'img/s (best)':>13}{'all rounds':>24}{'vs (a)':>8}{'vs (c)':>8}")
        for k, v in best.items():
            runs = ", ".join(f"{x:.0f}" for x in rates[k])
            print(f"{k:<28}{v:>13.0f}{runs:>24}{v / a:>7.1f}x{v / c:>8.0%}")
        label = "b' augment_stage (once)"
        print(f"{label:<28}{n / prep:>13.0f}{'source img/s':>24}")
        print(
            f"{'b amortised over ' + str(epochs) + ' epochs':<28}{amortised:>13.0f}"
            f"{'records/s':>24}{amortised / a:>7.1f}x{amortised / c:>8.0%}"
        )
        print(
            f"\ntargets ((b) = project_epoch): (b) >= 5x (a): "
            f"{'met' if b >= 5 * a else 'NOT met'} ({b / a:.1f}x); "
            f"(b) >= 60% of (c): {'met' if b >= 0.6 * c else 'NOT met'} ({b / c:.0%})"
        )
        one = best.get("b1 project_epoch_1_thread")
        if one:
            need = math.ceil(args.feed / one)
            print(
                "\nreader per CPU core (one tf.data thread, 224 px JPEG records): "
                f"{one:.0f} img/s; "
                f"all {cores} cores: {b:.0f} img/s ({b / cores:.0f} per core). To feed "
                f"{args.feed:.0f} img/s: {need} cores for the reader at the one-thread rate, "
                f"plus 1-2 for the training process"
            )
        print(f"load average at end: {os.getloadavg()}")
        print(
            json.dumps(
                {
                    "best_img_s": best,
                    "augment_stage_s": stage_s,
                    "n": n,
                    "records": n_records,
                    "amortised": amortised,
                }
            )
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
