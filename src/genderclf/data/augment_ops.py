"""Per-image operations for the augment stage (PIL + NumPy only, no TensorFlow).

Kept free of TensorFlow so that worker processes start fast and stay small.
Every variant is made with one fused affine warp (flip, rotation, zoom and shift
composed into a single matrix, one resample) plus a vectorised brightness/contrast
step, instead of one resample per transform.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps


@dataclass(frozen=True)
class AugmentParams:
    """The augmentation ranges (a plain copy of the `augment` settings for workers)."""

    flip: bool
    rotation_deg: float
    zoom: float
    shift: float
    brightness: float
    contrast: float


def load_rgb(path: str) -> Image.Image:
    """Open an image as RGB, applying its EXIF orientation (grayscale/CMYK/palette converted)."""
    with Image.open(path) as im:
        return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """An opened image as upright RGB: EXIF orientation applied, any mode converted.

    Transparency is composited on white rather than turning black. Decodes the image, so
    a truncated file raises OSError here.
    """
    im = ImageOps.exif_transpose(im)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


def fit_square(im: Image.Image, size: int, mode: str = "center_crop") -> Image.Image:
    """Resize to `size` x `size`: a centred square crop (keeps the aspect) or a stretch."""
    if mode == "center_crop":
        w, h = im.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side))
    return im.resize((size, size), Image.BILINEAR, reducing_gap=2.0)


def random_affine(size: int, p: AugmentParams, rng: np.random.Generator) -> tuple[float, ...]:
    """The PIL AFFINE coefficients (output -> input) for one random flip/rotate/zoom/shift."""
    theta = math.radians(rng.uniform(-p.rotation_deg, p.rotation_deg))
    scale = rng.uniform(1 - p.zoom, 1 + p.zoom)
    tx, ty = rng.uniform(-p.shift, p.shift, 2) * size
    flip = -1.0 if (p.flip and rng.random() < 0.5) else 1.0
    cos, sin = math.cos(theta), math.sin(theta)
    # inverse of: out = C + R(theta) * scale * F * (in - C) + T
    m = np.array([[flip * cos, flip * sin], [-sin, cos]]) / scale
    c = np.array([size / 2, size / 2])
    off = c - m @ (c + np.array([tx, ty]))
    return (m[0, 0], m[0, 1], off[0], m[1, 0], m[1, 1], off[1])


def random_photometric(arr: np.ndarray, p: AugmentParams, rng: np.random.Generator) -> np.ndarray:
    """Random contrast (around the image mean) then brightness, on a uint8 HxWx3 array."""
    x = arr.astype(np.float32)
    c = rng.uniform(1 - p.contrast, 1 + p.contrast)
    b = rng.uniform(1 - p.brightness, 1 + p.brightness)
    mean = x.mean(axis=(0, 1), keepdims=True)
    x = ((x - mean) * c + mean) * b
    return np.clip(x, 0, 255).astype(np.uint8)


def augment(base: Image.Image, p: AugmentParams, rng: np.random.Generator) -> Image.Image:
    """One augmented variant of an already square-resized image (same size)."""
    size = base.size[0]
    warped = base.transform(
        (size, size), Image.AFFINE, random_affine(size, p, rng), resample=Image.BILINEAR
    )
    return Image.fromarray(random_photometric(np.asarray(warped), p, rng))


def encode_jpeg(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
