"""The Ray engine against the local process pool, side by side in one run, and the driver's
memory in batch prediction on a cluster.

    uv run python benchmarks/cluster.py                                   # ~6 min on 2 cores
    uv run python benchmarks/cluster.py --images 4000 --predict-images 10000 100000

1. Engine overhead on the same two cores. The augment stage's work loop (decode, fit to
   64 px, one augmented copy, JPEG encode; the driver writes the shards) over the same
   sample images through `genderclf.io.parallel_map`: first the local pool (2 processes,
   spawned inside the timing, as in the stage), then a Ray cluster of one node with 2 CPUs
   on 127.0.0.1 (`tests/helpers/ray_cluster.py`). Ray is timed cold (connection and the
   workers' start, as a stage pays them) and warm (the same loop again in the same job).
   Printed: images/s of each, the ratios (target: Ray at least 80% of the pool), the
   share of the driver's time spent writing shards, and whether the shards are the same
   bytes.
2. Driver memory in batch predict. `genderclf predict <folder> --no-detect -f jsonl` on
   the cluster for folders of tiny JPEGs of each `--predict-images` size: the peak
   resident memory of the driver process (its own; Ray's workers are not its children)
   and the images/s. Flat means the same peak at every size.

The load average is printed with the results: the machine may be shared.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WRAPPER = (
    "import resource, subprocess, sys, time; t = time.perf_counter(); "
    "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
    "dt = time.perf_counter() - t; "
    "print('__STAT__', rc, dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True)"
)


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f}"


def _augment_loop(raw: Path, names: list[str], out: Path, size: int) -> tuple[float, float, str]:
    """The augment stage's loop over `names`: (seconds, seconds writing shards, digest)."""
    from tests.helpers.params import real_params, shrink

    from genderclf.config import parse_settings
    from genderclf.data.augment import CHUNK, AugmentParams, _process
    from genderclf.data.remote import RawSource
    from genderclf.data.tfrecords import ShardWriter
    from genderclf.io import chunked, parallel_map

    a = parse_settings(shrink(real_params()), "benchmark").augment
    job = {
        "source": RawSource(str(raw.resolve())),
        "size": size,
        "resize": a.resize,
        "quality": a.jpeg_quality,
        "copies": 1,
        "seed": 1,
        "split_seed": 0,
        "params": AugmentParams.of(a),
    }
    rows = ((i, n, i % 2, None) for i, n in enumerate(names))
    out.mkdir(parents=True)
    writer = ShardWriter(out, "train", 2 * len(names), 2000)
    writing = 0.0
    started = time.perf_counter()
    for chunk in parallel_map(_process, chunked(rows, CHUNK), workers=2, context=job):
        t = time.perf_counter()
        for path, label, images in chunk:
            for v, img in enumerate(images):
                writer.write(img, label, path, v)
        writing += time.perf_counter() - t
    writer.close()
    seconds = time.perf_counter() - started
    digest = hashlib.sha256()
    for f in writer.files:
        digest.update((out / f).read_bytes())
    return seconds, writing, digest.hexdigest()[:16]


def engine_overhead(n: int, size: int, work: Path) -> None:
    from genderclf.data import sample

    raw = work / "raw"
    raw.mkdir(parents=True)
    sample.generate(
        raw,
        n,
        seed=3,
        images_per_identity=10,
        male_fraction=0.42,
        cue_flip_fraction=0.03,
        workers=2,
        progress=False,
    )
    names = sorted(p.relative_to(raw).as_posix() for p in (raw / sample.IMAGE_SUBDIR).glob("*.jpg"))
    os.environ.pop("RAY_ADDRESS", None)
    local, local_write, local_digest = _augment_loop(raw, names, work / "local", size)

    from tests.helpers.ray_cluster import ray_cluster

    with ray_cluster(cpus=2, nodes=1) as cluster:
        os.environ.update(cluster.driver_env())
        from genderclf import engine

        t = time.perf_counter()
        engine.connect()
        connect = time.perf_counter() - t
        cold, cold_write, cold_digest = _augment_loop(raw, names, work / "ray-cold", size)
        warm, warm_write, warm_digest = _augment_loop(raw, names, work / "ray-warm", size)
        import ray

        ray.shutdown()
        for k in cluster.driver_env():
            os.environ.pop(k, None)

    print(f"\n1. engine overhead: augment's loop, {n} sample images -> {size} px + 1 copy")
    print(f"   {'engine':<38} {'seconds':>8} {'images/s':>9} {'vs pool':>8} {'writing':>8}")
    for name, s, w in (
        ("local pool, 2 processes (spawn incl.)", local, local_write),
        ("Ray, 1 node x 2 CPUs, cold", cold, cold_write),
        ("Ray, same job, warm", warm, warm_write),
    ):
        print(f"   {name:<38} {s:>8.1f} {n / s:>9.0f} {local / s:>8.0%} {w / s:>8.1%}")
    print(f"   Ray connection (ray.init, not in the above): {connect:.1f} s")
    same = local_digest == cold_digest == warm_digest
    print(f"   shards the same bytes on both engines: {same} ({local_digest})")
    print(
        f"   target Ray >= 80% of the pool: cold {local / cold:.0%}, warm {local / warm:.0%} "
        f"({'met' if local / warm >= 0.8 else 'NOT met'} warm, "
        f"{'met' if local / cold >= 0.8 else 'NOT met'} cold); {_load()}"
    )


def _tiny_images(folder: Path, n: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / f"{i // 1000:04d}"
        if i % 1000 == 0:
            sub.mkdir()
        pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"{i:07d}.jpg", quality=80)


def predict_memory(sizes: list[int], work: Path) -> None:
    import yaml
    from tests.helpers.params import real_params, shrink
    from tests.helpers.ray_cluster import ray_cluster

    from genderclf.config import parse_settings
    from genderclf.model.backbones import build_model

    raw = shrink(real_params(), {"train.backbone": "simple_cnn"})
    params = work / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    model = build_model(parse_settings(raw, "benchmark").train, 32)
    model_file = work / "model.keras"
    model.save(model_file)
    folders = {}
    for n in sizes:
        folders[n] = work / f"images-{n}"
        _tiny_images(folders[n], n)
    exe = str(Path(sys.executable).parent / "genderclf")
    results = {}
    with ray_cluster(cpus=2, nodes=1) as cluster:
        env = {**os.environ, **cluster.driver_env()}
        for n in sizes:
            cmd = [exe, "predict", str(folders[n]), "-m", str(model_file), "--params", str(params)]
            cmd += ["--no-detect", "-f", "jsonl", "-o", str(work / f"rows-{n}.jsonl"), "-q"]
            out = subprocess.run(
                [sys.executable, "-c", WRAPPER, *cmd], env=env, capture_output=True, text=True
            )
            stat = [ln for ln in out.stdout.splitlines() if ln.startswith("__STAT__")][-1].split()
            if stat[1] != "0":
                raise SystemExit(f"predict failed:\n{out.stderr[-3000:]}")
            rows = len((work / f"rows-{n}.jsonl").read_text().splitlines())
            results[n] = (float(stat[2]), int(stat[3]) / 1024, rows)
    print("\n2. driver memory, `genderclf predict <folder> --no-detect -f jsonl` on the cluster")
    print(f"   {'images':>8} {'rows':>8} {'seconds':>8} {'images/s':>9} {'driver peak MiB':>16}")
    for n, (s, mib, rows) in results.items():
        print(f"   {n:>8} {rows:>8} {s:>8.1f} {n / s:>9.0f} {mib:>16.0f}")
    peaks = [mib for _, mib, _ in results.values()]
    print(
        f"   peak ratio largest/smallest size: {max(peaks) / min(peaks):.2f} "
        f"(flat: ~1.0); {_load()}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--images", type=int, default=4000, help="sample images for part 1")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--predict-images", type=int, nargs="+", default=[10000, 100000])
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--skip-predict", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    print(f"start: {_load()}, {len(os.sched_getaffinity(0))} cores")
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        if not args.skip_engine:
            engine_overhead(args.images, args.image_size, Path(tmp) / "engine")
        if not args.skip_predict:
            (Path(tmp) / "predict").mkdir()
            predict_memory(sorted(args.predict_images), Path(tmp) / "predict")
    print(f"end: {_load()}")


if __name__ == "__main__":
    main()
