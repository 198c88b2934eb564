"""Data stages at several dataset sizes: wall time and peak memory per stage, side by side.

For each size, a fresh working folder gets a params.yaml derived from the repository's
(sample source, `--image-size`, `augment.copies: 0`), then each data stage runs as its
own `genderclf` process. Peak memory is the largest resident set of any process in the
stage's tree (ru_maxrss of the waited-for children, pool workers included). A plain
decode + resize pass over the same files, on all cores, runs in the same run as the
ceiling for the per-image stages.

With `--tiny` the dataset is written by this script instead of the sample generator: the
CelebA layout with all 40 attributes, partitions and identities, and one small unique JPEG
(32x36) per image, read through `data.source: dir`: as wide a manifest row as CelebA's at
a fraction of the disk and time, for memory at many images. The last table then says
whether each stage's peak is flat (within 20% from the smallest size to the largest).

    uv run python benchmarks/data_scale.py --sizes 2000 50000
    uv run python benchmarks/data_scale.py --sizes 20000 202599   # CelebA scale (issue 7)
    uv run python benchmarks/data_scale.py --tiny --sizes 20000 200000 600000   # issue 23

`--until split` stops after split (the stages that hold the manifest, issue 23's memory
target) and skips augment and the decode + resize ceiling, which only its rate targets use.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ("download", "validate", "split", "augment")
WRAPPER = (
    "import resource, subprocess, sys, time; t = time.perf_counter(); "
    "rc = subprocess.run(sys.argv[1:]).returncode; dt = time.perf_counter() - t; "
    "print('__STAT__', rc, dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True)"
)


def run_stage(workdir: Path, stage: str) -> tuple[float, float]:
    """Run `genderclf <stage>` in `workdir`; return (seconds, peak RSS MiB)."""
    exe = str(Path(sys.executable).parent / "genderclf")
    out = subprocess.run(
        [sys.executable, "-c", WRAPPER, exe, stage, "-q"]
        if stage != "split"
        else [sys.executable, "-c", WRAPPER, exe, stage],
        cwd=workdir,
        capture_output=True,
        text=True,
    )
    stat = [ln for ln in out.stdout.splitlines() if ln.startswith("__STAT__")][-1].split()
    if stat[1] != "0":
        raise SystemExit(
            f"{stage} failed in {workdir}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        )
    return float(stat[2]), int(stat[3]) / 1024


def _decode_resize(paths: list[str], size: int) -> int:
    from PIL import Image

    for p in paths:
        with Image.open(p) as im:
            im.convert("RGB").resize((size, size), Image.BILINEAR)
    return len(paths)


def decode_resize_rate(raw: Path, size: int, workers: int) -> float:
    """Images/s of a bare decode + resize over the dataset's images, on `workers` processes."""
    files = sorted(str(p) for p in (raw / "img_align_celeba" / "img_align_celeba").glob("*.jpg"))
    chunks = [files[i : i + 512] for i in range(0, len(files), 512)]
    t = time.perf_counter()
    with ProcessPoolExecutor(workers) as ex:
        n = sum(ex.map(_decode_resize, chunks, [size] * len(chunks)))
    return n / (time.perf_counter() - t)


def _tiny_chunk(args: tuple[str, int, int]) -> None:
    import numpy as np
    from PIL import Image

    folder, start, stop = args
    rng = np.random.default_rng(start)
    base = rng.integers(0, 255, (36, 32, 3), dtype=np.uint8)
    for i in range(start, stop):
        # The index in hexadecimal, one digit per flat grey 8x8 block in steps of 16 (JPEG
        # keeps a block's mean far finer than that): unique content per image.
        pixels = base.copy()
        for d in range(6):
            row, col = divmod(d, 4)
            pixels[8 * row : 8 * row + 8, 8 * col : 8 * col + 8] = 16 * ((i >> (4 * d)) & 15) + 8
        Image.fromarray(pixels).save(f"{folder}/{i + 1:06d}.jpg", quality=90)


def write_tiny(root: Path, n: int, workers: int) -> None:
    """A CelebA-format folder of `n` small unique JPEGs (see the module docstring)."""
    from genderclf.data import sample

    images = root / sample.IMAGE_SUBDIR
    images.mkdir(parents=True)
    step = 5000
    with ProcessPoolExecutor(workers) as ex:
        list(ex.map(_tiny_chunk, [(str(images), a, min(n, a + step)) for a in range(0, n, step)]))
    attrs = sample.CELEBA_ATTRIBUTES
    with (
        open(root / sample.ATTR_FILE, "w") as fa,
        open(root / sample.PARTITION_FILE, "w") as fp,
        open(root / sample.IDENTITY_FILE, "w") as fi,
    ):
        fa.write(",".join(["image_id", *attrs]) + "\n")
        fp.write("image_id,partition\n")
        for i in range(n):
            name, person = f"{i + 1:06d}.jpg", i // 20
            male = person % 5 < 2
            row = [
                ("1" if male else "-1") if a == "Male" else ("1" if (i + j) % 7 == 0 else "-1")
                for j, a in enumerate(attrs)
            ]
            fa.write(f"{name},{','.join(row)}\n")
            fp.write(f"{name},{(0, 0, 0, 0, 0, 0, 0, 0, 1, 2)[person % 10]}\n")
            fi.write(f"{name} {person}\n")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 50000])
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--tiny", action="store_true", help="small unique images, dir source")
    ap.add_argument("--keep", action="store_true", help="keep the working folders")
    ap.add_argument(
        "--until",
        choices=STAGES[1:],
        default=STAGES[-1],
        help="last stage to run (default: augment, and the decode + resize ceiling)",
    )
    args = ap.parse_args()
    stages = STAGES[: STAGES.index(args.until) + 1]
    ceiling = "augment" in stages
    if len(args.sizes) < 2:
        ap.error("give at least two sizes")
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    workers = len(os.sched_getaffinity(0))
    results: dict[int, dict] = {}
    for n in args.sizes:
        work = Path(tempfile.mkdtemp(prefix=f"data-scale-{n}-"))
        params = json.loads(json.dumps(base))
        params["data"]["sample"]["num_images"] = n
        params["base"]["image_size"] = args.image_size
        params["augment"]["copies"] = 0
        params["validate"]["min_rows"] = min(params["validate"]["min_rows"], n)
        if args.tiny:
            write_tiny(work / "source", n, workers)
            params["data"]["source"] = "dir"
            params["data"]["dir"]["path"] = str(work / "source")
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        res = {s: run_stage(work, s) for s in stages}
        if ceiling:
            res["decode_resize_ips"] = decode_resize_rate(
                work / "data" / "raw", args.image_size, workers
            )
        results[n] = res
        res["loadavg"] = os.getloadavg()
        print(
            f"{n:>7} images: "
            + ", ".join(f"{s} {res[s][0]:.1f}s/{res[s][1]:.0f}MiB" for s in stages)
            + (f", decode+resize ceiling {res['decode_resize_ips']:.0f} img/s" if ceiling else "")
            + f" (load avg {res['loadavg'][0]:.2f}/{res['loadavg'][1]:.2f})",
            flush=True,
        )
        if not args.keep:
            subprocess.run(["rm", "-rf", str(work)])
    sizes = sorted(args.sizes)
    small, large = sizes[0], sizes[-1]
    ratio = large / small
    head = "".join(f" {'time ' + str(n):>12}" for n in sizes)
    mem = "".join(f" {'MiB ' + str(n):>12}" for n in sizes)
    print(
        f"\n{'stage':<10}{head} {'time ratio':>11} {'image ratio':>12}{mem}"
        f" {'peak ratio':>11} {'img/s ' + str(large):>12} {'vs ceiling':>11}"
    )
    for s in stages:
        (t1, m1), (t2, m2) = results[small][s], results[large][s]
        ips = large / t2
        ceil = f"{ips / results[large]['decode_resize_ips']:>10.0%}" if ceiling else f"{'-':>10}"
        times = "".join(f" {results[n][s][0]:>11.1f}s" for n in sizes)
        peaks = "".join(f" {results[n][s][1]:>12.0f}" for n in sizes)
        print(
            f"{s:<10}{times} {t2 / t1:>11.2f} {ratio:>12.2f}{peaks}"
            f" {m2 / m1:>11.2f} {ips:>12.0f} {ceil}"
        )
    peak = max(results[n][s][1] for n in sizes for s in stages)
    print(
        f"\npeak resident memory over all stages and sizes: {peak:.0f} MiB "
        f"({'under' if peak < 2048 else 'OVER'} the 2 GiB target)"
    )
    if ceiling:
        print(
            f"decode+resize ceiling ({workers} processes): "
            + ", ".join(f"{n}: {results[n]['decode_resize_ips']:.0f} img/s" for n in sizes)
        )
    # Issue 7 targets, judged on the largest size (fixed start-up costs dominate the smaller);
    # issue 23: each stage's peak flat within 20% from the smallest size to the largest.
    print("\ntargets:")
    print(
        f"  peak memory < 2 GiB at every size: {'met' if peak < 2048 else 'NOT met'}"
        f" ({peak:.0f} MiB)"
    )
    for s in stages:
        tr = results[large][s][0] / results[small][s][0]
        print(
            f"  {s}: time ratio {tr:.2f} <= image ratio {ratio:.2f}: "
            f"{'met' if tr <= ratio else 'NOT met'}"
        )
    for s in ("validate", "augment") if ceiling else ():
        frac = large / results[large][s][0] / results[large]["decode_resize_ips"]
        print(
            f"  {s}: {frac:.0%} of the decode+resize rate (target >= 50%): "
            f"{'met' if frac >= 0.5 else 'NOT met'}"
        )
    for s in stages:
        peaks = [results[n][s][1] for n in sizes]
        flat = max(peaks) / min(peaks)
        print(
            f"  {s}: peak {min(peaks):.0f}-{max(peaks):.0f} MiB over {small}-{large} images, "
            f"ratio {flat:.2f} (flat within 20%): {'met' if flat <= 1.2 else 'NOT met'}"
        )
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
