"""The project's lists of choices, each declared once: the backbones and the data sources.

`config.py` types `train.backbone` and `data.source` from these lists (their allowed
values are the keys); `model/backbones.py` builds each backbone and `data/sources.py`
lists and fetches each source, both from the entries here. This module holds declarations
only and imports nothing of the project: every stage checks its settings against these
lists, so every stage depends on this file in `dvc.yaml`, and it changes only when a
choice is added (the code that does the work lives in the modules that only the stages
using it depend on).

* A backbone that Keras ships: one entry in `BACKBONES` (`keras_application`, the class
  in `keras.applications`).
* A backbone of our own: its entry with `keras_application=None`, and a function
  `build_<name>(image_size, weights)` in `model/backbones.py`.
* A data source: its entry in `SOURCES`, functions `fetch_<name>` and `list_<name>` in
  `data/sources.py`, and its settings section (`data.<name>`) in `config.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone: where its network comes from, how it scales its input, its blocks."""

    keras_application: str | None  # a class of keras.applications; None: build_<name>
    preprocess: str  # BackbonePreprocess mode: caffe | tf | unit
    min_size: int  # the smallest image side it takes
    blocks: tuple[tuple[str, ...], ...]  # layer-name prefixes of its blocks, top first


def _numbered(pattern: str, top: int, bottom: int) -> tuple[tuple[str, ...], ...]:
    return tuple((pattern.format(i),) for i in range(top, bottom - 1, -1))


BACKBONES: dict[str, BackboneSpec] = {
    "vgg16": BackboneSpec("VGG16", "caffe", 32, _numbered("block{}_", 5, 1)),
    "vgg19": BackboneSpec("VGG19", "caffe", 32, _numbered("block{}_", 5, 1)),
    "resnet50": BackboneSpec("ResNet50", "caffe", 32, _numbered("conv{}_", 5, 2)),
    "mobilenet_v2": BackboneSpec(
        "MobileNetV2",
        "tf",
        32,
        (("Conv_1", "out_relu", "block_16_"), *_numbered("block_{}_", 15, 1)),
    ),
    "simple_cnn": BackboneSpec(None, "unit", 16, _numbered("block{}_", 4, 1)),
}


@dataclass(frozen=True)
class SourceSpec:
    """A kind of dataset source: where its data is, and what its cheap listing compares."""

    # The key that says where the data is: in SOURCE.json, and (for dir and s3) in the
    # source's settings section `data.<name>` too.
    where: str
    required: str  # "" or what `data.<name>.<where>` must be set to (it has no default)
    compares: str  # what the listing compares, recorded in SOURCE.json
    url: str | None  # the location as a URL ("{}" = the location); None: made by code


SOURCES: dict[str, SourceSpec] = {
    "sample": SourceSpec("generator", "", "params and generator code", None),
    "kaggle": SourceSpec("slug", "", "slug", "https://www.kaggle.com/datasets/{}"),
    "dir": SourceSpec("path", "a folder", "path, size, mtime", "file://{}"),
    "s3": SourceSpec("uri", "s3://bucket/prefix", "key, size, ETag", "{}"),
}


def location(record: dict[str, Any]) -> tuple[str, str | None]:
    """Where the data of a SOURCE.json record came from: (location, the same as a URL, or
    None when code generated it), e.g. ("celeba/faces", "https://www.kaggle.com/...")."""
    spec = SOURCES.get(str(record.get("source")))
    if spec is None:
        return "unknown", None
    where = str(record.get(spec.where) or "unknown")
    return where, (spec.url.format(where) if spec.url and where != "unknown" else None)
