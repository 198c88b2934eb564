"""Training-step throughput of the project's own model: bare vs with its online augmentation.

Both models come from `genderclf.model.backbones.build_model` (the code the train stage
runs), with the settings of params.yaml and `--backbone`: `bare` is `online_augment: false`,
`pipeline` is `online_augment: true` (the fused augmentation layer, `train.aug_*` ranges).
The layer is written in `keras.ops`, so both compile under XLA on the TensorFlow and JAX
backends; the script prints whether each compiled model kept `jit_compile` on. No module
that imports TensorFlow is used (only `genderclf.config`, `genderclf.model.*` and Keras):
on the JAX backend it runs without TensorFlow installed.

For each policy both variants get a fresh model compiled with `--jit` and one fixed batch
of random images and labels converted to device tensors once; warm-up steps (compilation
included) are excluded. Then `--rounds` chunks of `--steps` timed steps alternate between
the two models and each variant's best chunk is reported, so bare and pipeline see the
same machine load. Every
`train_on_batch` returns its loss to the host, so each timed step has finished on the
device when the next starts.

FLOPs per image are counted from the layer shapes (2 x multiply-adds of every Conv2D and
Dense layer); a training step is taken as 3x the forward pass. The fraction of peak (MFU)
uses the device's dense bf16/fp16 tensor-core peak, picked from the device name.

    # GPU host (JAX; see benchmarks/gpu_check.sh for the install):
    KERAS_BACKEND=jax python benchmarks/train_throughput.py --policies mixed_float16
    # This machine (2 CPU cores): the demo's model and VGG16, TensorFlow backend
    uv run python benchmarks/train_throughput.py --backbone simple_cnn --image-size 48 \
        --batch-size 32 --steps 30 --policies float32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# Dense (no sparsity) tensor-core peaks in TFLOP/s for 16-bit floats (bf16 = fp16), from the
# vendors' data sheets. Matched in order against the device name.
PEAKS_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 125.0),
)


def device_name() -> str:
    """A human-readable name of the accelerator the backend computes on (or 'cpu')."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        d = jax.devices()[0]
        return d.device_kind if d.platform != "cpu" else "cpu"
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            return tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
        return "cpu"
    return "cpu"


def peak_tflops(name: str) -> float | None:
    for key, peak in PEAKS_TFLOPS:
        if key.lower() in name.lower():
            return peak
    return None


def project_model(args, augment: bool):
    """The train stage's model: `build_model` with params.yaml's `train` section."""
    if str(REPO / "src") not in sys.path:
        sys.path.insert(0, str(REPO / "src"))
    from genderclf.config import load_settings
    from genderclf.model.backbones import build_model

    settings = load_settings(REPO / "params.yaml")
    train = settings.train.model_copy(
        update={"backbone": args.backbone, "weights": None, "online_augment": augment}
    )
    return build_model(train, args.image_size), train


def _leaf_layers(model):
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _leaf_layers(layer)
        else:
            yield layer


def forward_flops_per_image(model) -> int:
    """2 x multiply-adds of every Conv2D and Dense layer, from the built layer shapes."""
    import keras

    total = 0
    for layer in _leaf_layers(model):
        if isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            kh, kw, c_in, _ = layer.kernel.shape
            total += 2 * h * w * c_out * kh * kw * c_in
        elif isinstance(layer, keras.layers.Dense):
            c_in, c_out = layer.kernel.shape
            total += 2 * c_in * c_out
    return int(total)


def measure(policy: str, args) -> dict[str, dict[str, float]]:
    """Compile a fresh bare and pipeline model under `policy`; time them in turn.

    After the warm-up steps (compilation) of both, `--rounds` chunks of `--steps` steps
    alternate between the two models (bare, pipeline, pipeline, bare, ...), so both see the
    same machine load; each variant's best chunk is kept.
    """
    import keras

    keras.mixed_precision.set_global_policy(policy)
    rng = np.random.default_rng(0)
    x_host = rng.uniform(0, 255, (args.batch_size, args.image_size, args.image_size, 3))
    y_host = rng.integers(0, 2, (args.batch_size, 1))
    # Converted once: the timed steps read device-resident tensors only.
    x = keras.ops.convert_to_tensor(x_host.astype("float32"))
    y = keras.ops.convert_to_tensor(y_host.astype("float32"))
    jit = {"on": True, "off": False, "auto": "auto"}[args.jit]
    models, out = {}, {}
    for variant in ("bare", "pipeline"):
        keras.utils.set_random_seed(0)
        model, _ = project_model(args, augment=variant == "pipeline")
        model.compile(
            optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy", jit_compile=jit
        )
        t = time.perf_counter()
        for _ in range(args.warmup):
            model.train_on_batch(x, y)  # the first call compiles
        models[variant] = model
        # Keras silently falls back to no XLA when a layer does not support it.
        out[variant] = {
            "warmup_s": time.perf_counter() - t,
            "jit": bool(model.jit_compile),
            "fwd_flops": forward_flops_per_image(model),
            "chunks": [],
        }
    for r in range(args.rounds):
        order = list(models.items()) if r % 2 == 0 else list(models.items())[::-1]  # ABBA
        for variant, model in order:
            t = time.perf_counter()
            for _ in range(args.steps):
                loss = model.train_on_batch(x, y)  # the loss comes back: the step is done
            rate = args.steps * args.batch_size / (time.perf_counter() - t)
            out[variant]["chunks"].append(rate)
            out[variant]["loss"] = float(np.asarray(loss).reshape(-1)[0])
    for m in out.values():
        m["images_per_s"] = max(m["chunks"])
        m["median_images_per_s"] = float(np.median(m["chunks"]))
    keras.mixed_precision.set_global_policy("float32")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--backbone", default="vgg16", help="train.backbone (default vgg16)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=50, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps (compilation)")
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="chunks of --steps steps, bare and pipeline in turn; best kept",
    )
    ap.add_argument(
        "--jit",
        choices=("on", "off", "auto"),
        default="on",
        help="jit_compile for model.compile (on: XLA)",
    )
    ap.add_argument(
        "--policies",
        nargs="+",
        default=["mixed_float16"],
        help="Keras dtype policies (the train stage uses mixed_float16 on a GPU)",
    )
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    import keras

    name = device_name()
    peak = peak_tflops(name)
    _, train = project_model(args, augment=True)
    print(
        f"keras {keras.__version__}, backend {keras.backend.backend()}, device: {name}; "
        f"{args.backbone} {args.image_size}x{args.image_size}, batch {args.batch_size}, "
        f"{args.rounds} x {args.steps} timed steps each after {args.warmup} warm-up, "
        f"jit_compile {args.jit}; augmentation: rotation {train.aug_rotation}, zoom "
        f"{train.aug_zoom}, shift {train.aug_shift}, contrast {train.aug_contrast}, "
        f"brightness {train.aug_brightness}, flip; load {os.getloadavg()[0]:.2f}"
    )
    if os.environ.get("XLA_FLAGS"):
        print(f"XLA_FLAGS={os.environ['XLA_FLAGS']}")
    if peak is None:
        print("peak: unknown for this device; fraction of peak not reported")
    else:
        print(f"peak assumed: {peak:.0f} TFLOP/s dense bf16/fp16 tensor core ({name})")
    results: dict[str, dict[str, float]] = {}
    for policy in args.policies:
        for variant, m in measure(policy, args).items():
            key = f"{variant} {policy}"
            results[key] = m
            achieved = m["images_per_s"] * 3 * m["fwd_flops"] / 1e12
            frac = f"{achieved / peak:.1%} of peak" if peak else "peak n/a"
            chunks = ", ".join(f"{c:.1f}" for c in m["chunks"])
            print(
                f"{key:<24} {m['images_per_s']:9.1f} images/s (best of {chunks}) "
                f"{achieved:8.2f} TFLOP/s ({frac}); warm-up {m['warmup_s']:.1f}s, "
                f"loss {m['loss']:.3f}, jit {m['jit']}",
                flush=True,
            )
    first = next(iter(results.values()))
    print(
        f"\nFLOPs per image: forward {first['fwd_flops'] / 1e9:.3f} GFLOP, training step "
        f"~3x = {3 * first['fwd_flops'] / 1e9:.3f} GFLOP"
    )
    print(
        f"{'policy':<16}{'bare img/s':>12}{'pipeline img/s':>16}{'pipeline/bare':>15}"
        f"{'bare MFU':>10}"
    )
    summary = {}
    for policy in args.policies:
        bare, pipe = results[f"bare {policy}"], results[f"pipeline {policy}"]
        ratio = pipe["images_per_s"] / bare["images_per_s"]
        mfu = bare["images_per_s"] * 3 * bare["fwd_flops"] / 1e12 / peak if peak else None
        shown = f"{mfu:.1%}" if mfu is not None else "n/a"
        print(
            f"{policy:<16}{bare['images_per_s']:>12.1f}{pipe['images_per_s']:>16.1f}"
            f"{ratio:>14.1%}{shown:>10}"
        )
        median = pipe["median_images_per_s"] / bare["median_images_per_s"]
        print(f"pipeline/bare of the median chunks ({policy}): {median:.1%}")
        print(
            f"target pipeline >= 90% of bare ({policy}): "
            f"{'met' if ratio >= 0.9 else 'NOT met'} ({ratio:.1%}); XLA kept: "
            f"bare {bare['jit']}, pipeline {pipe['jit']}"
        )
        if mfu is not None:
            print(
                f"target bare >= 50% of the dense 16-bit peak ({policy}): "
                f"{'met' if mfu >= 0.5 else 'NOT met'} ({mfu:.1%})"
            )
        summary[policy] = {"bare": bare, "pipeline": pipe, "ratio": ratio, "mfu": mfu}
    if args.json:
        args.json.write_text(
            json.dumps(
                {"device": name, "args": vars(args) | {"json": None}, "results": summary},
                indent=1,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
