"""Two training processes against one on the same cores: the cost of the all-reduce.

Makes a sample dataset with the project's stages (as `benchmarks/train_stage.py`), then
runs the real `genderclf train` in turn with `train.processes: 1` and `2` on the JAX
backend, the same global batch, `--rounds` times each in alternating order, and prints
the stage's own training rate (the median epoch's images/s, compilation excluded, from
`metrics/train.json`) and the ratio two/one. On one host both processes share the cores
the one process had, so the ratio shows what splitting the step and all-reducing the
gradients (gloo over loopback) costs, not a speed-up.

    uv run python benchmarks/distributed_train.py            # this machine: ~6 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--num-images", type=int, default=1200)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--backbone", default="simple_cnn")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3, help="phase-1 epochs (the first compiles)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from genderclf.config import Paths, parse_settings, set_dotted
    from genderclf.data.layouts import read_layout
    from genderclf.data.split import split_manifest, write_splits
    from genderclf.stages import augment, download

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in {
        "base.image_size": args.image_size,
        "data.source": "sample",
        "data.sample.num_images": args.num_images,
        "split.strategy": "stratified",
        "augment.copies": 0,
        "augment.shard_size": 100,
        "train.backbone": args.backbone,
        "train.weights": None,
        "train.batch_size": args.batch_size,
        "train.epochs_head": args.epochs,
        "train.epochs_finetune": 0,
        "train.early_stopping_patience": args.epochs + 1,
        "train.deterministic": "on",
    }.items():
        set_dotted(raw, key, value)
    settings = parse_settings(raw, "distributed_train.py params")
    work = Path(tempfile.mkdtemp(prefix="distributed-train-"))
    paths = Paths().under(work / "data-root")
    download.run(settings, paths, progress=False)
    parts = split_manifest(read_layout(paths.raw).rows, settings.split, settings.base.seed)
    write_splits(parts, paths.splits)
    meta = augment.run(settings, paths, progress=False).meta
    print(f"data: {meta['splits']['train']['records']} train records at {args.image_size} px")

    rates: dict[int, list[float]] = {1: [], 2: []}
    for r in range(args.rounds):
        for n in (1, 2) if r % 2 == 0 else (2, 1):
            folder = work / f"p{n}-r{r}"
            (folder / "data").mkdir(parents=True)
            (folder / "data" / "prepared").symlink_to(paths.prepared.resolve())
            set_dotted(raw, "train.processes", n)
            (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
            env = {
                **os.environ,
                "KERAS_BACKEND": "jax",
                "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
            }
            env.pop("RAY_ADDRESS", None)
            t = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "genderclf.pipeline", "train"],
                cwd=folder,
                env=env,
                check=True,
                stdout=subprocess.DEVNULL,
            )
            m = json.loads((folder / "metrics" / "train.json").read_text())
            rates[n].append(m["images_per_second"])
            print(
                f"round {r + 1}, {n} process(es): {m['images_per_second']} images/s "
                f"(median epoch), stage {time.perf_counter() - t:.0f}s",
                flush=True,
            )
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print(
        f"\n{args.backbone} {args.image_size} px, global batch {args.batch_size}, "
        f"{os.cpu_count()} cores: one process {one:.0f} images/s, two processes {two:.0f} "
        f"images/s; two / one = {two / one:.2f}"
    )


if __name__ == "__main__":
    main()
