"""VGG16 training throughput on synthetic data already on the device, float32 vs mixed precision.

The model is the project's classifier for `train.backbone: vgg16` (raw 0..255 pixels ->
caffe preprocessing -> VGG16 without its top -> global average pooling -> dropout -> one
float32 sigmoid unit), built from `keras.applications.VGG16(weights=None)` and the
project's Keras-only preprocessing layer, so it runs on any Keras 3 backend. TensorFlow
is imported only when the backend is `tensorflow`; no `genderclf` module that imports
TensorFlow is used. `--augment keras` puts the project's online augmentation layers
(flip, rotation, zoom, contrast; ranges from params.yaml `train.aug_*`) in front of the
model, `--augment fused` a jit-compatible single-affine equivalent, to measure what
augmentation on the accelerator costs.

Each precision gets a fresh model compiled with `jit_compile=True` and one fixed batch of
random images and labels converted to device tensors once; warm-up steps (compilation
included) are excluded from the timed steps. Every `train_on_batch` returns its loss to the
host, so each timed step has finished on the device when the next starts.

FLOPs per image are counted from the layer shapes (2 x multiply-adds of every Conv2D and
Dense layer); a training step is taken as 3x the forward pass (forward, plus gradients
with respect to activations and to weights). The fraction of peak uses the device's
dense bf16/fp16 tensor-core peak, picked from the device name and printed.

    # GPU host with JAX only (install the Keras wheel and its pure-Python deps, no TensorFlow):
    KERAS_BACKEND=jax python benchmarks/train_throughput.py --batch-size 256 --steps 50
    KERAS_BACKEND=jax python benchmarks/train_throughput.py --policies mixed_float16 --augment fused
    # CPU smoke check (any backend):
    uv run python benchmarks/train_throughput.py --batch-size 2 --steps 2 --warmup 1
"""

from __future__ import annotations

import argparse
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


def aug_settings() -> dict[str, float]:
    """`train.aug_*` from params.yaml (the defaults there if PyYAML or the file is absent)."""
    vals = {"aug_rotation": 0.03, "aug_zoom": 0.1, "aug_contrast": 0.1}
    try:
        import yaml

        train = yaml.safe_load((REPO / "params.yaml").read_text())["train"]
        vals.update({k: float(train[k]) for k in vals if k in train})
    except (ImportError, OSError, KeyError):
        pass
    return vals


def fused_augment_layer(rotation: float, zoom: float, contrast: float):
    """A jit-compatible alternative to the Random* layers (measured with `--augment fused`).

    Per image: flip, rotation and zoom composed into one transform matrix, applied to the
    whole batch by one `keras.ops.image.affine_transform` call (one bilinear resample per
    image, reflect fill), then contrast around each image's mean, vectorised. Keras'
    RandomRotation and RandomZoom set `supports_jit = False`, which turns XLA off for the
    whole training step; this layer keeps it on.
    """
    import math

    import keras
    from keras import ops

    class FusedAugment(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.seed_gen = keras.random.SeedGenerator(0)
            # TensorFlow's ImageProjectiveTransformV3 has no XLA kernel; JAX's version jits.
            self.supports_jit = keras.backend.backend() != "tensorflow"

        def call(self, x, training=None):
            if not training:
                return x
            b = ops.shape(x)[0]
            h, w = x.shape[1], x.shape[2]
            u = keras.random.uniform((4, b), seed=self.seed_gen)
            theta = (2 * u[0] - 1) * rotation * 2 * math.pi  # fraction of a turn, as Keras
            scale = 1 + (2 * u[1] - 1) * zoom
            flip = ops.where(u[2] < 0.5, -1.0, 1.0)
            cos, sin = ops.cos(theta), ops.sin(theta)
            # output -> input mapping: in = C + F R(theta) (out - C) / scale
            a0, a1 = flip * cos / scale, flip * sin / scale
            b0, b1 = -sin / scale, cos / scale
            cx, cy = (w - 1) / 2, (h - 1) / 2
            a2, b2 = cx - a0 * cx - a1 * cy, cy - b0 * cx - b1 * cy
            zero = ops.zeros_like(a0)
            m = ops.stack([a0, a1, a2, b0, b1, b2, zero, zero], axis=1)
            x = ops.image.affine_transform(
                x, ops.cast(m, x.dtype), interpolation="bilinear", fill_mode="reflect"
            )
            c = ops.reshape(1 + (2 * u[3] - 1) * contrast, (-1, 1, 1, 1))
            mean = ops.mean(x, axis=(1, 2), keepdims=True)
            return ops.clip((x - mean) * ops.cast(c, x.dtype) + mean, 0, 255)

    return FusedAugment(name="fused_augment")


def build_model(image_size: int, augment: str, dropout: float = 0.3):
    """The project's vgg16 classifier (see src/genderclf/model/backbones.py), TF-free."""
    import keras

    if str(REPO / "src") not in sys.path:
        sys.path.insert(0, str(REPO / "src"))
    from genderclf.model.layers import BackbonePreprocess

    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = inputs
    a = aug_settings()
    if augment == "keras":  # what genderclf.model.backbones.augmentation builds
        x = keras.layers.RandomFlip("horizontal")(x)
        x = keras.layers.RandomRotation(a["aug_rotation"], fill_mode="reflect")(x)
        x = keras.layers.RandomZoom(a["aug_zoom"], fill_mode="reflect")(x)
        x = keras.layers.RandomContrast(a["aug_contrast"], value_range=(0, 255))(x)
    elif augment == "fused":
        x = fused_augment_layer(a["aug_rotation"], a["aug_zoom"], a["aug_contrast"])(x)
    # The project's own preprocessing layer (genderclf.model.layers imports Keras only).
    x = BackbonePreprocess("caffe", name="preprocess")(x)
    base = keras.applications.VGG16(
        include_top=False, weights=None, input_shape=(image_size, image_size, 3)
    )
    x = base(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(dropout)(x)
    out = keras.layers.Dense(1, activation="sigmoid", dtype="float32")(x)
    return keras.Model(inputs, out, name="genderclf_vgg16")


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


def measure(policy: str, args) -> dict[str, float]:
    """Compile a fresh model under `policy`; return timed training-step figures."""
    import keras

    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
    model = build_model(args.image_size, args.augment)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        loss="binary_crossentropy",
        jit_compile=True,
    )
    # Keras silently falls back to no XLA when a layer does not support it.
    jit = bool(getattr(model, "jit_compile", True))
    rng = np.random.default_rng(0)
    x_host = rng.uniform(0, 255, (args.batch_size, args.image_size, args.image_size, 3))
    y_host = rng.integers(0, 2, (args.batch_size, 1))
    # Converted once: the timed steps read device-resident tensors only.
    x = keras.ops.convert_to_tensor(x_host.astype("float32"))
    y = keras.ops.convert_to_tensor(y_host.astype("float32"))
    t = time.perf_counter()
    for _ in range(args.warmup):
        model.train_on_batch(x, y)  # first call compiles
    warm_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(args.steps):
        loss = model.train_on_batch(x, y)  # returns the loss on the host: the step is done
    dt = time.perf_counter() - t
    flops = forward_flops_per_image(model)
    keras.mixed_precision.set_global_policy("float32")
    return {
        "steps_per_s": args.steps / dt,
        "images_per_s": args.steps * args.batch_size / dt,
        "fwd_flops": flops,
        "warmup_s": warm_s,
        "loss": float(np.asarray(loss).reshape(-1)[0]),
        "jit": jit,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=50, help="timed steps per precision")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps (compilation)")
    ap.add_argument(
        "--policies",
        nargs="+",
        default=["float32", "mixed_float16"],
        help="Keras dtype policies to compare (the project uses mixed_float16)",
    )
    ap.add_argument(
        "--augment",
        choices=("none", "keras", "fused"),
        default="none",
        help="online augmentation in the model: none, the project's Keras Random* layers, "
        "or one fused affine per image",
    )
    args = ap.parse_args()

    import keras

    name = device_name()
    peak = peak_tflops(name)
    print(
        f"keras {keras.__version__}, backend {keras.backend.backend()}, device: {name}; "
        f"batch {args.batch_size}, {args.image_size}x{args.image_size}, {args.steps} timed steps "
        f"after {args.warmup} warm-up; online augmentation in the model: {args.augment}"
    )
    if os.environ.get("XLA_FLAGS"):
        print(f"XLA_FLAGS={os.environ['XLA_FLAGS']}")
    if peak is None:
        print("peak: unknown for this device; fraction of peak not reported")
    else:
        print(f"peak assumed: {peak:.0f} TFLOP/s dense bf16/fp16 tensor core ({name})")
    results = {}
    for policy in args.policies:
        r = measure(policy, args)
        results[policy] = r
        train_flops = 3 * r["fwd_flops"]
        achieved = r["images_per_s"] * train_flops / 1e12
        frac = f"{achieved / peak:.1%} of peak" if peak else "peak n/a"
        print(
            f"{policy:<15} {r['steps_per_s']:8.2f} steps/s {r['images_per_s']:9.1f} images/s  "
            f"{achieved:7.1f} TFLOP/s ({frac}); warm-up {r['warmup_s']:.1f}s, loss {r['loss']:.3f}, jit {r['jit']}",
            flush=True,
        )
    first = next(iter(results.values()))
    print(
        f"\nFLOPs per image: forward {first['fwd_flops'] / 1e9:.2f} GFLOP "
        f"(= {first['fwd_flops'] / 2e9:.2f} G multiply-adds), training step ~3x = "
        f"{3 * first['fwd_flops'] / 1e9:.1f} GFLOP"
    )
    if len(results) > 1:
        base, *rest = args.policies
        for p in rest:
            ratio = results[p]["images_per_s"] / results[base]["images_per_s"]
            print(f"{p} / {base}: {ratio:.2f}x")
    mixed = [p for p in results if p.startswith("mixed")]
    if name != "cpu" and mixed:
        best = max(mixed, key=lambda p: results[p]["images_per_s"])
        ips = results[best]["images_per_s"]
        verdict = "met" if ips >= 3000 else "NOT met"
        print(f"target >= 3,000 images/s with mixed precision: {verdict} ({best}: {ips:.0f})")


if __name__ == "__main__":
    main()
