"""Custom layers saved inside the model, written with `keras.ops` only (any backend).

Registered as serializable so a saved `.keras` file loads with Keras' safe mode on
(no Lambda layers, no pickled Python code).
"""

from __future__ import annotations

import math

import keras
from keras import ops

# Per-channel means of ImageNet in BGR order, the "caffe" convention of VGG and ResNet50.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="genderclf")
class BackbonePreprocess(keras.layers.Layer):
    """Map raw RGB pixels in [0, 255] to what a backbone expects.

    Modes (as `keras.applications.*.preprocess_input`):
      * `caffe`: RGB -> BGR, subtract the ImageNet channel means (VGG16/19, ResNet50).
      * `tf`: scale to [-1, 1] (MobileNetV2).
      * `unit`: scale to [0, 1] (the small CNN trained from scratch).

    Kept inside the model so inference needs no separate preprocessing; never stack a
    `rescale=1/255` on top of it (the classic VGG16 notebook bug).
    """

    def __init__(self, mode: str = "caffe", **kwargs):
        super().__init__(**kwargs)
        if mode not in ("caffe", "tf", "unit"):
            raise ValueError(f"BackbonePreprocess mode must be caffe, tf or unit; got {mode!r}")
        self.mode = mode

    def call(self, x):
        x = ops.cast(x, self.compute_dtype)
        if self.mode == "caffe":
            x = ops.flip(x, axis=-1)  # RGB -> BGR
            return x - ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype=self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        return x / 255.0

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="genderclf")
class FusedAugment(keras.layers.Layer):
    """Online augmentation in one pass, active only in training (`training=True`).

    Per image: a random horizontal flip, rotation, zoom and shift composed into ONE affine
    map (output pixel -> input pixel), applied with one bilinear resample; then contrast
    around each channel's mean and a brightness factor, clipped to 0..255. Written with
    `keras.ops` gathers rather than `ops.image.affine_transform`: TensorFlow's kernel
    behind that op (ImageProjectiveTransformV3) has no XLA kernel, and Keras'
    `RandomRotation`/`RandomZoom` set `supports_jit = False`, which turns XLA off for the
    whole training step. This layer compiles under XLA on TensorFlow and JAX alike.

    Ranges mean what Keras' layers mean (and `train.aug_*` in params.yaml):
      * `rotation`: fraction of a full turn; the angle is uniform in +-rotation * 360 deg
        (`RandomRotation(factor)`).
      * `zoom`: the sampled area's side is scaled by 1 + U(-zoom, zoom); above 1 zooms out
        (`RandomZoom(factor)`).
      * `shift`: translation, a fraction of the side, uniform in +-shift per axis.
      * `contrast`: factor 1 + U(-contrast, contrast) around each channel's mean
        (`RandomContrast(factor, value_range=(0, 255))`).
      * `brightness`: factor 1 + U(-brightness, brightness) (the augment stage's meaning).
    `fill_mode`: `reflect` (half-sample symmetric, as Keras' reflect) or `nearest`.

    The layer computes in float32 whatever the global policy (pixel coordinates need
    float32's precision at 224 px); the preprocessing after it casts to the policy.
    Randomness comes from a `keras.random.SeedGenerator(seed)`: the same seed gives the
    same augmentations; `seed=None` draws one from the global seed
    (`keras.utils.set_random_seed`).
    """

    def __init__(
        self,
        rotation: float = 0.0,
        zoom: float = 0.0,
        shift: float = 0.0,
        contrast: float = 0.0,
        brightness: float = 0.0,
        flip: bool = True,
        fill_mode: str = "reflect",
        seed: int | None = None,
        **kwargs,
    ):
        kwargs["dtype"] = kwargs.get("dtype") or "float32"
        super().__init__(**kwargs)
        if fill_mode not in ("reflect", "nearest"):
            raise ValueError(
                f"FusedAugment fill_mode must be reflect or nearest; got {fill_mode!r}"
            )
        for name, value in (
            ("rotation", rotation),
            ("zoom", zoom),
            ("shift", shift),
            ("contrast", contrast),
            ("brightness", brightness),
        ):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"FusedAugment {name} must be in [0, 1); got {value!r}")
        self.rotation, self.zoom, self.shift = float(rotation), float(zoom), float(shift)
        self.contrast, self.brightness = float(contrast), float(brightness)
        self.flip, self.fill_mode, self.seed = bool(flip), fill_mode, seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def compute_output_shape(self, input_shape):
        return input_shape

    def call(self, images, training=None):
        if not training:
            return images
        x = ops.cast(images, "float32")
        b = ops.shape(x)[0]
        # One draw per image and transform, in [-1, 1): rotation, zoom, shift x, shift y,
        # contrast, brightness, flip.
        u = keras.random.uniform((7, b), minval=-1.0, maxval=1.0, seed=self.seed_generator)
        flip = ops.where(u[6] < 0.0, -1.0, 1.0) if self.flip else ops.ones_like(u[6])
        if self.rotation or self.zoom or self.shift:
            x = self._warp(x, u[0], u[1], u[2:4], flip)
        elif self.flip:  # a flip alone needs no resample
            x = ops.where(ops.reshape(flip, (-1, 1, 1, 1)) < 0, ops.flip(x, axis=2), x)
        if self.contrast:
            c = ops.reshape(1.0 + self.contrast * u[4], (-1, 1, 1, 1))
            mean = ops.mean(x, axis=(1, 2), keepdims=True)
            x = (x - mean) * c + mean
        if self.brightness:
            x = x * ops.reshape(1.0 + self.brightness * u[5], (-1, 1, 1, 1))
        return ops.clip(x, 0.0, 255.0)

    def _warp(self, x, u_rot, u_zoom, u_shift, flip):
        """Resample every image through its own affine map, bilinear, in one gather pass."""
        h, w, c = x.shape[1], x.shape[2], x.shape[3]
        theta = u_rot * (self.rotation * 2.0 * math.pi)
        scale = 1.0 + self.zoom * u_zoom
        cos, sin = ops.cos(theta) * scale, ops.sin(theta) * scale
        col = lambda v: ops.reshape(v, (-1, 1, 1))  # noqa: E731 - per image, over (H, W)
        # Output -> input about the image centre: in = C + scale * R(theta) * F * (out - C) + T.
        xs = ops.reshape(ops.arange(w, dtype="float32") - (w - 1) / 2.0, (1, 1, w))
        ys = ops.reshape(ops.arange(h, dtype="float32") - (h - 1) / 2.0, (1, h, 1))
        xs = xs * col(flip)
        xi = (w - 1) / 2.0 + col(cos) * xs - col(sin) * ys + col(u_shift[0] * (self.shift * w))
        yi = (h - 1) / 2.0 + col(sin) * xs + col(cos) * ys + col(u_shift[1] * (self.shift * h))
        xi, yi = self._fill(xi, w), self._fill(yi, h)
        x0, y0 = ops.floor(xi), ops.floor(yi)
        wx, wy = ops.expand_dims(xi - x0, -1), ops.expand_dims(yi - y0, -1)
        x0 = ops.cast(x0, "int32")
        y0 = ops.cast(y0, "int32")
        x1, y1 = ops.minimum(x0 + 1, w - 1), ops.minimum(y0 + 1, h - 1)
        flat = ops.reshape(x, (-1, c))
        base = col(ops.arange(ops.shape(x)[0], dtype="int32") * (h * w))

        def at(yy, xx):
            return ops.reshape(
                ops.take(flat, ops.reshape(base + yy * w + xx, (-1,)), axis=0), (-1, h, w, c)
            )

        top = at(y0, x0) * (1.0 - wx) + at(y0, x1) * wx
        bottom = at(y1, x0) * (1.0 - wx) + at(y1, x1) * wx
        return top * (1.0 - wy) + bottom * wy

    def _fill(self, coord, size: int):
        """Input coordinates folded back into the image (`reflect`) or clamped (`nearest`)."""
        if self.fill_mode == "reflect":  # d c b a | a b c d | d c b a, about the pixel edges
            t = ops.mod(coord + 0.5, 2.0 * size)
            coord = ops.where(t < size, t, 2.0 * size - t) - 0.5
        return ops.clip(coord, 0.0, size - 1.0)

    def get_config(self):
        return {
            **super().get_config(),
            "rotation": self.rotation,
            "zoom": self.zoom,
            "shift": self.shift,
            "contrast": self.contrast,
            "brightness": self.brightness,
            "flip": self.flip,
            "fill_mode": self.fill_mode,
            "seed": self.seed,
        }
