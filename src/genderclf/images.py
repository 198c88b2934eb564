"""Opening one image, the one way: size checked before decoding, errors with a reason.

Used by validation (which records the reason in `rejected.csv`), the augment stage,
`genderclf predict` and the served model, so a file is judged the same everywhere.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from genderclf.config import GenderclfError

# The image files a dataset or a photo folder may hold, with the format PIL must find.
IMAGE_FORMATS = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".bmp": "BMP",
    ".gif": "GIF",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".ppm": "PPM",
    ".pgm": "PPM",
}
IMAGE_EXTENSIONS = frozenset(IMAGE_FORMATS)
# Refuse bigger images (decompression bombs) rather than exhaust memory. `genderclf predict`
# takes its own limit from `predict.max_pixels`.
MAX_PIXELS = 50_000_000
CONVERTIBLE_MODES = {"RGB", "L", "LA", "RGBA", "CMYK", "P", "PA", "I;16", "I", "F", "1", "YCbCr"}

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not be padded


class ImageError(GenderclfError, ValueError):
    """One image cannot be used. `reason` is a short code (`truncated`, `too_large`, ...)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _looks_like_text(data: bytes) -> bool:
    head = data[:512]
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def read_bytes(source: str | os.PathLike[str] | bytes) -> bytes:
    """The bytes of an image file (or the bytes given).

    Raises:
        ImageError: `unreadable` (missing, a folder, no permission) or `zero_byte`.
    """
    if isinstance(source, bytes | bytearray):
        data = bytes(source)
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as err:
            raise ImageError("unreadable", f"cannot read the file: {err.strerror or err}") from None
    if not data:
        raise ImageError("zero_byte", "empty file")
    return data


def decode(
    data: bytes, max_pixels: int = MAX_PIXELS, limit: str = "the pixel limit"
) -> Image.Image:
    """Decode image bytes fully, checking the size from the header first.

    Args:
        max_pixels: refuse images with more pixels (named `limit` in the message).

    Raises:
        ImageError: `text_file`, `not_an_image`, `too_large`, `truncated` or `corrupt`.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(
                    "too_large",
                    f"image is {w}x{h} = {w * h:,} pixels, over "
                    f"{limit}={max_pixels:,}; downscale it or raise the limit",
                )
            im.load()
            return im
    except ImageError:
        raise
    except UnidentifiedImageError:
        if _looks_like_text(data):
            raise ImageError(
                "text_file", "not an image: text content behind an image extension"
            ) from None
        raise ImageError(
            "not_an_image", "not an image PIL can read (unknown or unsupported format)"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError("too_large", f"refused as a decompression bomb: {err}") from None
    except (OSError, SyntaxError, ValueError) as err:
        # Truncated JPEGs raise OSError("image file is truncated ..."); broken PNG chunks
        # raise SyntaxError; odd modes ValueError.
        msg = str(err)
        truncated = "truncated" in msg.lower() or isinstance(err, SyntaxError) or "premature" in msg
        raise ImageError(
            "truncated" if truncated else "corrupt", f"corrupt or truncated image: {msg}"
        ) from None


def to_rgb(im: Image.Image) -> Image.Image:
    """An opened image as upright RGB: EXIF orientation applied, any mode converted.

    Transparency is composited on white rather than turning black.

    Raises:
        ImageError: `unsupported_mode` for a mode PIL cannot convert.
    """
    if im.mode not in CONVERTIBLE_MODES:
        raise ImageError("unsupported_mode", f"unsupported colour mode {im.mode}")
    try:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            return Image.alpha_composite(bg, im).convert("RGB")
        return im.convert("RGB")
    except (OSError, ValueError) as err:
        raise ImageError("unsupported_mode", f"cannot convert {im.mode} to RGB ({err})") from None


def load_rgb(
    source: str | os.PathLike[str] | bytes,
    max_pixels: int = MAX_PIXELS,
    limit: str = "the pixel limit",
) -> Image.Image:
    """Read an image file (or encoded bytes) as upright RGB, refusing what cannot be used.

    Raises:
        ImageError: with the reason (see `read_bytes`, `decode`, `to_rgb`).
    """
    return to_rgb(decode(read_bytes(source), max_pixels, limit))


def fit_square(im: Image.Image, size: int, mode: str = "center_crop") -> Image.Image:
    """Resize to `size` x `size`: a centred square crop (keeps the aspect) or a stretch."""
    if mode == "center_crop":
        w, h = im.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side))
    return im.resize((size, size), Image.BILINEAR, reducing_gap=2.0)


def is_image_name(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS
