"""The real train stage end to end over TFRecords: its own images/s per epoch.

Makes a sample dataset in a temporary folder with the project's stages (download of the
sample generator, the split, the augment stage writing the TFRecord shards at
`--image-size`; validation is skipped, the layout's rows go straight to the split), then
runs `genderclf.stages.train.run` (the code `genderclf train` runs, without MLflow) on
the backend `KERAS_BACKEND` names. The stage prints one line per epoch with its own
images/s (the epoch's training steps, the first epoch's compilation excluded); this
script prints them again with the target, and the whole stage's wall time.

The first epoch compiles the training step, so at least two epochs are run and the last
one is the timed epoch. Settings not given here come from params.yaml (`train.*`
`auto` resolves per host: mixed precision and XLA on with a GPU).

    # GPU worker (see benchmarks/gpu_check.sh): 30,000 sample images at 224 px, VGG16
    KERAS_BACKEND=jax python benchmarks/train_stage.py --num-images 30000
    # CPU smoke check
    uv run python benchmarks/train_stage.py --num-images 300 --image-size 32 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))


def compare(args, raw: dict, paths, records: int) -> None:
    """The stage once per value of `--compare KEY=A,B`, in turn, on the same prepared data."""
    from dataclasses import replace

    from genderclf.config import Paths, parse_settings, set_dotted
    from genderclf.stages import train

    key, _, values = args.compare.partition("=")
    rates: dict[str, list[float]] = {v: [] for v in values.split(",")}
    for r in range(args.repeats):
        for value in rates if r % 2 == 0 else list(rates)[::-1]:
            set_dotted(raw, key, yaml.safe_load(value))
            settings = parse_settings(raw, f"train_stage.py {key}={value}")
            out = Paths().under(paths.prepared.parent.parent / f"{value}-{r}")
            report = train.run(settings, replace(out, prepared=paths.prepared))
            # every epoch after the first (which compiles), the stage's own rates
            epoch_rates = [h["images_per_second"] for h in report.history[1:]]
            rates[value].extend(x for x in epoch_rates if x)
            print(
                f"round {r + 1} {key}={value}: images/s per epoch "
                f"{[h['images_per_second'] for h in report.history]}",
                flush=True,
            )
    base, *others = rates
    med = {v: sorted(x)[len(x) // 2] for v, x in rates.items() if x}
    print(
        f"\n{key}, median epoch images/s over {records} records, epochs after the first: "
        + ", ".join(f"{v}: {m:.1f}" for v, m in med.items())
    )
    for v in others:
        print(f"{key}={v} / {key}={base}: {med[v] / med[base]:.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--num-images", type=int, default=30000, help="sample images to make")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--backbone", default="vgg16")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2, help="phase-1 epochs; the last is timed")
    ap.add_argument("--target", type=float, default=3000.0, help="images/s to meet")
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="more params overrides, e.g. train.jit_compile=off",
    )
    ap.add_argument(
        "--compare",
        metavar="KEY=A,B",
        help="run the stage once per value on the same data, in turn "
        "(--repeats times), e.g. train.deterministic=on,off; prints the ratios",
    )
    ap.add_argument("--repeats", type=int, default=1, help="rounds of --compare")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the working folder")
    args = ap.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from genderclf.config import Paths, parse_settings, set_dotted
    from genderclf.data.layouts import read_layout
    from genderclf.data.split import split_manifest, write_splits
    from genderclf.stages import augment, download, train

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    overrides = {
        "base.image_size": args.image_size,
        "data.source": "sample",
        "data.sample.num_images": args.num_images,
        "split.strategy": "stratified",
        "augment.copies": 0,
        "train.backbone": args.backbone,
        "train.weights": None,
        "train.batch_size": args.batch_size,
        "train.epochs_head": args.epochs,
        "train.epochs_finetune": 0,
        "train.early_stopping_patience": args.epochs + 1,
    }
    for kv in args.set:
        key, _, value = kv.partition("=")
        overrides[key] = yaml.safe_load(value)
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    settings = parse_settings(raw, "train_stage.py params")
    work = Path(tempfile.mkdtemp(prefix="train-stage-"))
    paths = Paths().under(work)
    try:
        t = time.perf_counter()
        download.run(settings, paths, progress=False)
        parts = split_manifest(read_layout(paths.raw).rows, settings.split, settings.base.seed)
        write_splits(parts, paths.splits)
        data = augment.run(settings, paths, progress=False).data
        records = data.split("train").records
        print(
            f"data: {args.num_images} sample images -> {records} train records at "
            f"{args.image_size} px in {time.perf_counter() - t:.0f}s",
            flush=True,
        )

        import keras

        if args.compare:
            compare(args, raw, paths, records)
            return
        t = time.perf_counter()
        report = train.run(settings, paths)
        wall = time.perf_counter() - t
        rates = [r.get("images_per_second") for r in report.history]
        timed = rates[-1]
        print(
            f"\nbackend {keras.config.backend()}, {args.backbone} {args.image_size} px, batch "
            f"{args.batch_size}: images/s per epoch (stage's own) {rates}; stage wall "
            f"{wall:.0f}s for {len(rates)} epochs of {records} images"
        )
        if timed:
            verdict = "met" if timed >= args.target else "NOT met"
            print(
                f"target stage end to end >= {args.target:.0f} images/s at {args.image_size} "
                f"px: {verdict} ({timed:.0f}, the last epoch)"
            )
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "backend": keras.config.backend(),
                        "rates": rates,
                        "records": records,
                        "wall_s": wall,
                        "metrics": report.metrics,
                    },
                    default=str,
                )
            )
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
