"""Backbones, the classifier built on them, its preprocessing layer and safe loading.

Every backbone is built for real (Keras, TensorFlow backend, CPU) at 32px without
pretrained weights; tests never download anything.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from genderclf.config import SettingsError, TrainSettings
from genderclf.model.backbones import (
    BACKBONES,
    ModelConfigError,
    build_model,
    check_compatible,
    unfreeze_top_blocks,
)
from genderclf.model.layers import BackbonePreprocess
from genderclf.model.saving import ModelLoadError, load_model

SIZE = 32


def _train(make_settings, **over) -> TrainSettings:
    """Tiny train settings through the real validation (`train.weights: null`)."""
    return make_settings(
        {"train.weights": None, **{f"train.{k}": v for k, v in over.items()}}
    ).train


def _pixels(n: int = 2, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_builds_and_outputs_one_probability(make_settings, name):
    train = _train(make_settings, backbone=name)
    model = build_model(train, SIZE)
    assert model.input_shape == (None, SIZE, SIZE, 3)
    assert model.get_layer("preprocess").mode == BACKBONES[name].preprocess
    # no pretrained weights: nothing to protect, the whole backbone trains from the start
    assert model.get_layer("backbone").trainable
    out = keras.ops.convert_to_numpy(model(_pixels(), training=False))
    assert out.shape == (2, 1)
    assert out.dtype == np.float32
    assert np.all((out >= 0) & (out <= 1))


def test_online_augmentation_is_off_at_inference(make_settings):
    model = build_model(_train(make_settings, backbone="simple_cnn", online_augment=True), SIZE)
    assert "augmentation" in [layer.name for layer in model.layers]
    x = _pixels(4)
    first = keras.ops.convert_to_numpy(model(x, training=False))
    second = keras.ops.convert_to_numpy(model(x, training=False))
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("name", ["vgg16", "vgg19", "resnet50", "mobilenet_v2"])
def test_image_size_below_the_backbone_minimum_names_base_image_size(make_settings, name):
    train = _train(make_settings, backbone=name)
    with pytest.raises(ModelConfigError, match=rf"base\.image_size=16 .*train\.backbone={name}"):
        check_compatible(train, 16)
    with pytest.raises(ModelConfigError, match=r"base\.image_size"):
        build_model(train, 16)


def test_simple_cnn_takes_the_smallest_allowed_image_size(make_settings):
    train = _train(make_settings, backbone="simple_cnn")
    assert check_compatible(train, 16).name == "simple_cnn"
    out = build_model(train, 16)(_pixels(1, 16), training=False)
    assert tuple(out.shape) == (1, 1)


@pytest.mark.parametrize(("name", "blocks"), [("vgg16", 5), ("resnet50", 4), ("simple_cnn", 4)])
def test_more_finetune_blocks_than_the_backbone_has_names_the_param(make_settings, name, blocks):
    assert check_compatible(_train(make_settings, backbone=name, finetune_blocks=blocks), SIZE)
    train = _train(make_settings, backbone=name, finetune_blocks=blocks + 1)
    with pytest.raises(ModelConfigError, match=rf"train\.finetune_blocks={blocks + 1} .*{blocks}"):
        check_compatible(train, SIZE)


def test_unknown_backbone_is_rejected_by_settings_and_by_the_model_code(make_settings):
    with pytest.raises(SettingsError, match=r"train\.backbone: allowed values are"):
        make_settings({"train.backbone": "alexnet"})
    # Settings built without validation (e.g. by library users) still fail clearly.
    unchecked = _train(make_settings).model_copy(update={"backbone": "alexnet"})
    with pytest.raises(ModelConfigError, match=r"train\.backbone='alexnet' is unknown"):
        check_compatible(unchecked, SIZE)


def test_simple_cnn_has_no_pretrained_weights(make_settings):
    train = _train(make_settings, backbone="simple_cnn").model_copy(update={"weights": "imagenet"})
    with pytest.raises(ModelConfigError, match=r"train\.weights"):
        build_model(train, SIZE)


# --- fine-tuning -----------------------------------------------------------------------------


def _trainable_layers(model: keras.Model) -> set[str]:
    base = model.get_layer("backbone")
    return {layer.name for layer in base.layers if layer.trainable and layer.weights}


def test_unfreeze_from_scratch_keeps_the_whole_backbone_training(make_settings):
    train = _train(make_settings, backbone="vgg16", finetune_blocks=1)
    model = build_model(train, SIZE)
    names = unfreeze_top_blocks(model, train)
    base = model.get_layer("backbone")
    assert names == [layer.name for layer in base.layers]
    assert _trainable_layers(model) == {layer.name for layer in base.layers if layer.weights}


@pytest.mark.parametrize(
    ("name", "blocks", "expected_prefixes"),
    [
        ("vgg16", 1, ("block5_",)),
        ("vgg16", 2, ("block5_", "block4_")),
        ("resnet50", 1, ("conv5_",)),
        ("mobilenet_v2", 2, ("Conv_1", "block_16_", "block_15_")),
    ],
)
def test_unfreeze_in_pretrained_mode_opens_only_the_top_blocks_without_batchnorm(
    make_settings, name, blocks, expected_prefixes
):
    # The layer selection depends on the architecture and `train.weights`, not on the weight
    # values, so a randomly initialised backbone stands in for the ImageNet one here.
    train = _train(make_settings, backbone=name, finetune_blocks=blocks)
    model = build_model(train, SIZE)
    pretrained = train.model_copy(update={"weights": "imagenet"})
    names = unfreeze_top_blocks(model, pretrained)

    base = model.get_layer("backbone")
    expected = {
        layer.name
        for layer in base.layers
        if layer.name.startswith(expected_prefixes)
        and layer.weights
        and not isinstance(layer, keras.layers.BatchNormalization)
    }
    assert expected  # the prefixes do match real layers of this backbone
    assert set(names) == expected == _trainable_layers(model)
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            assert not layer.trainable, layer.name
    head = {v.path for v in model.get_layer("male_prob").trainable_weights}
    backbone_paths = {v.path for n in expected for v in base.get_layer(n).trainable_weights}
    assert {v.path for v in model.trainable_weights} == head | backbone_paths


def test_pretrained_backbone_is_frozen_and_its_batchnorm_stays_in_inference_mode(
    make_settings, tmp_path
):
    """The recipe's trap: unfreezing must not let BatchNorm statistics drift.

    Keras applications accept a weights file in place of "imagenet"; a file saved from a
    randomly initialised MobileNetV2 stands in for the download (tests have no network).
    """
    weights_file = tmp_path / "mobilenet_v2_notop.weights.h5"
    keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(SIZE, SIZE, 3)
    ).save_weights(str(weights_file))
    train = _train(make_settings, backbone="mobilenet_v2", finetune_blocks=1, online_augment=False)
    train = train.model_copy(update={"weights": str(weights_file)})

    model = build_model(train, SIZE)
    base = model.get_layer("backbone")
    assert not base.trainable
    assert {v.path for v in model.trainable_weights} == {
        v.path for v in model.get_layer("male_prob").weights
    }

    names = unfreeze_top_blocks(model, train)
    assert "Conv_1" in names and "block_15_project" not in names
    model.compile(keras.optimizers.SGD(0.1), loss="binary_crossentropy")
    bn = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    head = model.get_layer("male_prob")
    low_conv = base.get_layer("block_15_project")
    before = {
        "bn": [keras.ops.convert_to_numpy(layer.moving_mean).copy() for layer in bn],
        "head": keras.ops.convert_to_numpy(head.bias).copy(),
        "low": keras.ops.convert_to_numpy(low_conv.kernel).copy(),
    }
    model.train_on_batch(_pixels(8, seed=1), np.ones(8, dtype="float32"))

    assert not np.allclose(keras.ops.convert_to_numpy(head.bias), before["head"])  # it trained
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(low_conv.kernel), before["low"])
    for layer, mean in zip(bn, before["bn"], strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.moving_mean), mean)


# --- preprocessing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "reference"),
    [
        ("caffe", keras.applications.vgg16.preprocess_input),
        ("caffe", keras.applications.resnet50.preprocess_input),
        ("tf", keras.applications.mobilenet_v2.preprocess_input),
        ("unit", lambda x: x / 255.0),
    ],
)
def test_backbone_preprocess_matches_keras_applications(mode, reference):
    x = _pixels(3, 8, seed=2)
    x[0, 0, 0] = [255.0, 0.0, 128.0]  # channel order matters for caffe (RGB -> BGR)
    got = keras.ops.convert_to_numpy(BackbonePreprocess(mode)(x))
    np.testing.assert_allclose(got, reference(x.copy()), rtol=1e-5, atol=1e-4)


def test_caffe_preprocess_is_bgr_minus_imagenet_means_not_a_rescale():
    pixel = np.array([[[[255.0, 0.0, 128.0]]]], dtype="float32")
    got = keras.ops.convert_to_numpy(BackbonePreprocess("caffe")(pixel)).reshape(3)
    np.testing.assert_allclose(got, [128.0 - 103.939, 0.0 - 116.779, 255.0 - 123.68], rtol=1e-6)


def test_backbone_preprocess_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="caffe, tf or unit"):
        BackbonePreprocess("imagenet")


# --- saving and loading ----------------------------------------------------------------------


def test_saved_model_reloads_in_safe_mode_with_the_same_predictions(make_settings, tmp_path):
    model = build_model(_train(make_settings, backbone="simple_cnn"), SIZE)
    path = tmp_path / "model.keras"
    model.save(str(path))
    loaded = load_model(path)
    assert loaded.get_layer("preprocess").mode == "unit"
    x = _pixels(3)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(x, training=False)),
        keras.ops.convert_to_numpy(model(x, training=False)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_a_file_that_is_not_a_model_gives_model_load_error_naming_it(tmp_path):
    bad = tmp_path / "model.keras"
    bad.write_bytes(b"not a zip archive")
    with pytest.raises(ModelLoadError, match=str(bad)):
        load_model(bad)


def test_a_model_that_needs_unsafe_deserialization_is_refused(tmp_path):
    inp = keras.Input((4,))
    out = keras.layers.Lambda(lambda t: t * 2)(inp)  # arbitrary Python code in the file
    path = tmp_path / "lambda.keras"
    keras.Model(inp, out).save(str(path))
    with pytest.raises(ModelLoadError, match=rf"{path}.*(?i:safe)"):
        load_model(path)


def test_a_missing_model_file_says_which_stage_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dvc repro train"):
        load_model(Path(tmp_path) / "absent.keras")
