"""Same inputs, same bytes: the files DVC hashes do not change when a stage writes the same
thing again (issue 21: `genderclf train` run twice made the pipeline stale)."""

from __future__ import annotations

import hashlib
import time
import zipfile
from pathlib import Path

import numpy as np


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_a_model_saved_twice_gives_the_same_bytes(tmp_path, make_settings):
    """Built twice from the same seed in one process (the layers' shared objects at other
    memory addresses), saved more than a zip-clock tick apart."""
    import keras

    from genderclf.model.backbones import build_model
    from genderclf.model.saving import load_model, save_model

    train = make_settings({"train.backbone": "simple_cnn", "train.weights": None}).train
    ours, theirs = [], []
    for i in (1, 2):
        keras.backend.clear_session()
        keras.utils.set_random_seed(0)
        model = build_model(train, 16)
        model.compile("adam", "binary_crossentropy")
        ours.append(save_model(model, tmp_path / f"model{i}.keras"))
        model.save(tmp_path / f"keras{i}.keras")  # Keras' own save, for comparison
        theirs.append(tmp_path / f"keras{i}.keras")
        if i == 1:
            time.sleep(2.1)
    assert _md5(theirs[0]) != _md5(theirs[1])  # dates and addresses: what the rewrite removes
    assert _md5(ours[0]) == _md5(ours[1])
    with zipfile.ZipFile(ours[0]) as z:
        assert {i.date_time for i in z.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        assert b"date_saved" not in z.read("metadata.json")
    x = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype("float32")
    np.testing.assert_array_equal(
        load_model(ours[0]).predict(x, verbose=0), load_model(theirs[0]).predict(x, verbose=0)
    )


def test_a_profile_saved_twice_gives_the_same_bytes(tmp_path):
    from genderclf.monitor.profile import FEATURES, Profile

    rng = np.random.default_rng(0)
    prof = Profile(
        ["a.jpg", "b.jpg"],
        rng.random((2, len(FEATURES))),
        rng.random((2, 4)),
        np.array([0.2, 0.9]),
        np.array([0, 1]),
        meta={"source": "test"},
    )
    first = prof.save(tmp_path / "a.npz")
    time.sleep(2.1)
    assert _md5(prof.save(tmp_path / "b.npz")) == _md5(first)
    assert Profile.load(first).names == ["a.jpg", "b.jpg"]
