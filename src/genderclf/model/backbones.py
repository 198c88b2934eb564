"""Backbones and the classifier built on them (the Keras transfer-learning recipe).

`BACKBONES` holds one `Backbone` per entry of `genderclf.catalog.BACKBONES`, the one list
of backbones (the settings' allowed `train.backbone` values come from it too).

`build_model` returns a model that takes raw RGB pixels (0..255) and holds everything
inference needs: online augmentation (active only in training), the backbone's own
preprocessing, the backbone, and a small head (global average pooling, dropout, one
sigmoid unit).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras

from genderclf import catalog
from genderclf.config import GenderclfError, TrainSettings
from genderclf.model.layers import BackbonePreprocess, FusedAugment


class ModelConfigError(GenderclfError, ValueError):
    """A train setting the chosen backbone cannot honour; names the param."""


# Keras' default BatchNorm momentum (0.99) needs several hundred steps before the moving
# statistics describe the network being trained; until then inference-mode predictions (and
# the val_loss that EarlyStopping and the best checkpoint select on) are near the class prior.
# A from-scratch CNN on a small dataset may not get that many steps: 0.9 converges in ~50.
_SIMPLE_CNN_BN_MOMENTUM = 0.9


def build_simple_cnn(image_size: int, weights: str | None) -> keras.Model:
    """A small CNN trained from scratch (the tests' and the demo's backbone)."""
    if weights == "imagenet":
        raise ModelConfigError(
            "train.weights=imagenet is not available for train.backbone=simple_cnn "
            "(it is trained from scratch): set train.weights: null"
        )
    inp = keras.Input((image_size, image_size, 3))
    x = inp
    for i, filters in enumerate((32, 64, 128, 256), start=1):
        for j in (1, 2):
            x = keras.layers.Conv2D(
                filters, 3, padding="same", use_bias=False, name=f"block{i}_conv{j}"
            )(x)
            x = keras.layers.BatchNormalization(
                momentum=_SIMPLE_CNN_BN_MOMENTUM, name=f"block{i}_bn{j}"
            )(x)
            x = keras.layers.Activation("relu", name=f"block{i}_relu{j}")(x)
        x = keras.layers.MaxPooling2D(name=f"block{i}_pool")(x)
    model = keras.Model(inp, x, name="simple_cnn")
    if weights is not None:  # a file saved from an earlier simple_cnn backbone
        model.load_weights(weights)
    return model


class WeightsDownloadError(ModelConfigError):
    """`train.weights: imagenet` and the weights file could not be fetched."""


def _app(name: str) -> Callable[[int, str | None], keras.Model]:
    cls = getattr(keras.applications, name)

    def make(image_size: int, weights: str | None) -> keras.Model:
        try:
            return cls(include_top=False, weights=weights, input_shape=(image_size, image_size, 3))
        except Exception as err:
            # Keras' get_file raises a bare Exception("URL fetch failure on <url>: ...").
            if weights != "imagenet" or "URL fetch failure" not in str(err):
                raise
            raise _fetch_failed(str(err)) from None

    return make


def _fetch_failed(message: str) -> WeightsDownloadError:
    """One line: what could not be fetched, from where, why, and the offline alternative."""
    import re

    found = re.search(r"URL fetch failure on (\S+): (.*)", message)
    url, why = (found.group(1), found.group(2)) if found else ("the Keras weights URL", message)
    why = why.strip().removeprefix("None -- ")  # Keras' "<errno> -- <reason>", errno unset
    name = url.rsplit("/", 1)[-1]
    return WeightsDownloadError(
        f"train.weights=imagenet: could not fetch the ImageNet weights {name} from {url} "
        f"({why}). Without a route to it, copy that file from a machine with a "
        f"network (where Keras keeps it in ~/.keras/models/, or $KERAS_HOME/models/ once it "
        f"has downloaded it) and set train.weights: /path/to/{name}"
    )


@dataclass(frozen=True)
class Backbone:
    name: str
    factory: Callable[[int, str | None], keras.Model]
    preprocess: str  # BackbonePreprocess mode
    min_size: int
    # Layer-name prefixes of the blocks, top (closest to the head) first.
    blocks: tuple[tuple[str, ...], ...]


BACKBONES: dict[str, Backbone] = {
    name: Backbone(
        name,
        _app(spec.keras_application) if spec.keras_application else globals()[f"build_{name}"],
        spec.preprocess,
        spec.min_size,
        spec.blocks,
    )
    for name, spec in catalog.BACKBONES.items()
}


def check_compatible(train: TrainSettings, image_size: int) -> Backbone:
    """The backbone for `train.backbone`, after checking the image size fits it.

    Raises:
        ModelConfigError: naming `base.image_size` or `train.*`.
    """
    bb = BACKBONES.get(train.backbone)
    if bb is None:
        raise ModelConfigError(
            f"train.backbone={train.backbone!r} is unknown; allowed: {sorted(BACKBONES)}"
        )
    if image_size < bb.min_size:
        raise ModelConfigError(
            f"base.image_size={image_size} is too small for train.backbone={bb.name} "
            f"(needs at least {bb.min_size})"
        )
    if train.weights not in (None, "imagenet") and not Path(train.weights).is_file():
        raise ModelConfigError(
            f"train.weights={train.weights!r}: no such file (from {Path.cwd()}). Give the path "
            f"of a local weights file for {bb.name} without its top (for ImageNet weights: "
            f"the .h5 file Keras caches in ~/.keras/models/, copied to this machine), or set "
            "train.weights: imagenet to download them, or null to train from scratch"
        )
    if train.finetune_blocks > len(bb.blocks):
        raise ModelConfigError(
            f"train.finetune_blocks={train.finetune_blocks} but {bb.name} has only "
            f"{len(bb.blocks)} blocks"
        )
    return bb


def augmentation(train: TrainSettings) -> FusedAugment:
    """Online augmentation, active only when the model is called with training=True.

    Flip, rotation, zoom and shift as one affine warp per image, then contrast and
    brightness (`train.aug_*`); written in `keras.ops`, so XLA compiles the training step.
    """
    return FusedAugment(
        rotation=train.aug_rotation,
        zoom=train.aug_zoom,
        shift=train.aug_shift,
        contrast=train.aug_contrast,
        brightness=train.aug_brightness,
        flip=True,
        fill_mode="reflect",
        name="augmentation",
    )


def build_model(
    train: TrainSettings, image_size: int, backbone: Backbone | None = None
) -> keras.Model:
    """The classifier: [augmentation] -> preprocessing -> backbone -> GAP -> dropout -> sigmoid.

    With pretrained weights the backbone starts frozen and is always called with
    `training=False`, so its BatchNorm layers stay in inference mode even after the top
    blocks are unfrozen (unfreezing must not wreck the learned statistics). Without
    pretrained weights there is nothing to protect: the backbone trains from the start.
    `backbone` is what `check_compatible` returned, when the caller checked already.
    """
    bb = backbone or check_compatible(train, image_size)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = augmentation(train)(inputs) if train.online_augment else inputs
    x = BackbonePreprocess(bb.preprocess, name="preprocess")(x)
    try:
        base = bb.factory(image_size, train.weights)
    except (ValueError, OSError) as err:
        if train.weights in (None, "imagenet"):
            raise
        raise ModelConfigError(
            f"train.weights={train.weights!r} could not be loaded into train.backbone="
            f"{bb.name} (without its top) at base.image_size={image_size}: {err}"
        ) from err
    base.name = "backbone"
    pretrained = train.weights is not None
    base.trainable = not pretrained
    x = base(x, training=False) if pretrained else base(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(train.dropout, name="dropout")(x)
    # float32 output even under mixed precision, for a numerically stable loss.
    out = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="male_prob")(x)
    return keras.Model(inputs, out, name=f"genderclf_{bb.name}")


def unfreeze_top_blocks(model: keras.Model, train: TrainSettings) -> list[str]:
    """Phase 2: make the top `train.finetune_blocks` blocks of the backbone trainable.

    Returns:
        Names of the layers made trainable.
    """
    bb = BACKBONES[train.backbone]
    base = model.get_layer("backbone")
    if train.weights is None:
        base.trainable = True  # trained from scratch: everything keeps training
        return [layer.name for layer in base.layers]
    prefixes = tuple(p for block in bb.blocks[: train.finetune_blocks] for p in block)
    base.trainable = True
    names = []
    for layer in base.layers:
        # BatchNorm stays frozen: its statistics came from the pretraining data.
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = layer.name.startswith(prefixes) and not is_bn
        if layer.trainable and layer.weights:
            names.append(layer.name)
    return names
