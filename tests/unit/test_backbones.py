"""Backbones, the classifier built on them, its preprocessing layer and safe loading.

Every backbone is built for real (Keras, TensorFlow backend, CPU) at 32px without
pretrained weights; tests never download anything.
"""

from __future__ import annotations

import math
import warnings
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
from genderclf.model.fit import check_jit_settings, use_jit_compile, xla_blockers
from genderclf.model.layers import BackbonePreprocess, FusedAugment
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
    assert isinstance(model.get_layer("augmentation"), FusedAugment)
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


def test_a_local_weights_file_is_loaded_into_the_backbone(make_settings, tmp_path):
    """`train.weights: <path>`: a cluster without internet keeps the weights on a share."""
    donor = build_model(_train(make_settings, backbone="simple_cnn"), SIZE).get_layer("backbone")
    path = tmp_path / "share" / "simple_cnn_notop.weights.h5"
    path.parent.mkdir()
    donor.save_weights(str(path))
    train = _train(make_settings, backbone="simple_cnn", weights=str(path))  # real validation
    model = build_model(train, SIZE)
    base = model.get_layer("backbone")
    for got, want in zip(base.weights, donor.weights, strict=True):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(got), keras.ops.convert_to_numpy(want)
        )
    assert not base.trainable  # pretrained: phase 1 trains the head only


def test_a_missing_or_misnamed_weights_file_names_train_weights(make_settings, tmp_path):
    missing = _train(make_settings, backbone="vgg16", weights=str(tmp_path / "absent.h5"))
    with pytest.raises(ModelConfigError, match=r"train\.weights='.*absent\.h5': no such file"):
        check_compatible(missing, SIZE)
    with pytest.raises(SettingsError, match=r"train\.weights: .*imagenet, null, or the path"):
        make_settings({"train.weights": "imagenet21k"})
    wrong = tmp_path / "wrong.weights.h5"
    keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(SIZE, SIZE, 3)
    ).save_weights(str(wrong))
    with pytest.raises(
        ModelConfigError, match=r"could not be loaded into train\.backbone=simple_cnn"
    ):
        build_model(_train(make_settings, backbone="simple_cnn", weights=str(wrong)), SIZE)


# --- online augmentation: one fused affine warp in keras.ops ---------------------------------

_U = {  # per image: rotation, zoom, shift (x, y) draws in [-1, 1], and the flip sign
    "rot": np.array([0.7, -0.3, 0.1], "float32"),
    "zoom": np.array([0.5, -0.8, 0.9], "float32"),
    "shift": np.array([[0.3, -0.5, 0.0], [0.2, 0.4, -0.9]], "float32"),
    "flip": np.array([1.0, -1.0, 1.0], "float32"),
}


@pytest.mark.parametrize("fill_mode", ["reflect", "nearest"])
def test_fused_warp_equals_keras_affine_transform_with_the_same_matrix(fill_mode):
    """The gather-based warp (XLA-compatible) computes what Keras' own op computes."""
    h, w, rot, zoom, shift = 20, 24, 0.1, 0.3, 0.1
    x = _pixels(3, 20, seed=3)[:, :, :, :].repeat(2, axis=2)[:, :, :w]
    layer = FusedAugment(rotation=rot, zoom=zoom, shift=shift, fill_mode=fill_mode)
    got = keras.ops.convert_to_numpy(
        layer._warp(keras.ops.convert_to_tensor(x), _U["rot"], _U["zoom"], _U["shift"], _U["flip"])
    )
    theta, scale = _U["rot"] * rot * 2 * math.pi, 1 + zoom * _U["zoom"]
    cos, sin = np.cos(theta) * scale, np.sin(theta) * scale
    a0, a1, b0, b1 = cos * _U["flip"], -sin, sin * _U["flip"], cos
    cx, cy = (w - 1) / 2, (h - 1) / 2
    a2 = cx - a0 * cx - a1 * cy + _U["shift"][0] * shift * w
    b2 = cy - b0 * cx - b1 * cy + _U["shift"][1] * shift * h
    zero = np.zeros_like(a0)
    matrix = np.stack([a0, a1, a2, b0, b1, b2, zero, zero], axis=1).astype("float32")
    want = keras.ops.convert_to_numpy(
        keras.ops.image.affine_transform(x, matrix, interpolation="bilinear", fill_mode=fill_mode)
    )
    np.testing.assert_allclose(got, want, atol=5e-3)


def test_fused_warp_of_a_quarter_turn_is_a_rotation_by_90_degrees():
    x = _pixels(1, 9, seed=4)
    layer = FusedAugment(rotation=0.25)
    one = np.ones(1, "float32")
    got = keras.ops.convert_to_numpy(layer._warp(x, one, 0 * one, np.zeros((2, 1), "float32"), one))
    # a positive angle turns the image counter-clockwise, as in Keras' RandomRotation
    np.testing.assert_allclose(got[0], np.rot90(x[0], k=1), atol=1e-3)


def test_flip_alone_mirrors_some_images_and_keeps_the_others():
    x = _pixels(16, 8, seed=5)
    got = keras.ops.convert_to_numpy(FusedAugment(seed=1)(x, training=True))
    mirrored = [np.array_equal(g, xi[:, ::-1]) for g, xi in zip(got, x, strict=True)]
    kept = [np.array_equal(g, xi) for g, xi in zip(got, x, strict=True)]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True))
    assert any(mirrored) and any(kept)


def test_fused_augment_is_seeded_training_only_and_stays_in_pixel_range():
    def layer(seed):
        return FusedAugment(
            rotation=0.05, zoom=0.2, shift=0.1, contrast=0.3, brightness=0.3, seed=seed
        )

    x = _pixels(4, SIZE, seed=6)
    a = keras.ops.convert_to_numpy(layer(7)(x, training=True))
    b = keras.ops.convert_to_numpy(layer(7)(x, training=True))
    c = keras.ops.convert_to_numpy(layer(8)(x, training=True))
    np.testing.assert_array_equal(a, b)  # same seed, same augmentation
    assert not np.allclose(a, c)
    assert a.dtype == np.float32 and a.min() >= 0 and a.max() <= 255
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(7)(x)), x)  # inference


def test_fused_augment_rejects_out_of_range_settings():
    with pytest.raises(ValueError, match="reflect or nearest"):
        FusedAugment(fill_mode="wrap")
    with pytest.raises(ValueError, match=r"zoom must be in \[0, 1\)"):
        FusedAugment(zoom=1.5)


def test_the_pipeline_model_compiles_under_xla_on_the_tensorflow_backend(make_settings):
    """Keras' RandomRotation/RandomZoom made Keras drop jit_compile=True for the whole step
    ("Model doesn't support jit_compile=True"); the fused layer keeps XLA on."""
    if keras.config.backend() != "tensorflow":
        pytest.skip("the TensorFlow backend's XLA is the one checked here")
    train = _train(
        make_settings,
        backbone="simple_cnn",
        online_augment=True,
        aug_shift=0.05,
        aug_brightness=0.1,
    )
    model = build_model(train, SIZE)
    assert xla_blockers(model) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a "doesn't support jit_compile" warning fails the test
        model.compile(keras.optimizers.Adam(1e-3), loss="binary_crossentropy", jit_compile=True)
    assert model.jit_compile is True
    y = np.array([0, 1, 0, 1], "float32")
    losses = [float(model.train_on_batch(_pixels(4, seed=s), y)) for s in range(2)]
    assert model.jit_compile is True and all(np.isfinite(losses))


def test_jit_compile_setting_resolves_per_model_and_host(make_settings):
    model = build_model(_train(make_settings, backbone="simple_cnn"), SIZE)
    assert use_jit_compile("on", model, deterministic=False) is True
    assert use_jit_compile("off", model, deterministic=False) is False
    # this host has no GPU: off on TensorFlow; on JAX, off would mean op by op
    assert use_jit_compile("auto", model, deterministic=False) is (keras.config.backend() == "jax")
    inp = keras.Input((SIZE, SIZE, 3))
    old = keras.Model(inp, keras.layers.RandomRotation(0.1)(inp))  # what build_model used
    assert xla_blockers(old) and use_jit_compile("auto", old, deterministic=False) is False
    with pytest.raises(ModelConfigError, match=r"train\.jit_compile=on but layers"):
        use_jit_compile("on", old, deterministic=False)
    if keras.config.backend() == "tensorflow":
        with pytest.raises(ModelConfigError, match=r"train\.deterministic"):
            use_jit_compile("on", model, deterministic=True)
        # and before anything starts (the train stage's prepare): auto is on without a GPU
        conflict = _train(make_settings, jit_compile="on", deterministic="auto")
        with pytest.raises(ModelConfigError, match=r"train\.jit_compile=on but train\.determ"):
            check_jit_settings(conflict)
        check_jit_settings(_train(make_settings, jit_compile="on", deterministic="off"))


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
    aug = loaded.get_layer("augmentation")  # the custom layer, rebuilt in safe mode
    assert isinstance(aug, FusedAugment)
    assert aug.get_config() == model.get_layer("augmentation").get_config()
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
