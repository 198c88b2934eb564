"""What a set of images looks like to the champion: image statistics, embeddings, predictions.

The same code profiles the reference (the evaluate stage, on a seeded sample of the test
split's raw images) and a new batch (`genderclf drift`), so the two are comparable by
construction: each image is opened the one way (`genderclf.inference.open_rgb`), fitted to
the model input as val/test images are (`Classifier.fit`: no face detection, the batch is
expected to hold face crops like the training data), and scored by the classifier with its
calibration and threshold. The embedding is the model's pooled layer (`pool`, the input of
the head), read in the same forward pass as P(male).

The reference is saved as one small `.npz` (a few hundred rows; embeddings as float16).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from genderclf.config import GenderclfError
from genderclf.inference import Classifier, ImageError, open_rgb
from genderclf.io import atomic_file, reproducible_zip

FEATURES = ["width", "height", "brightness", "contrast", "saturation", "red", "green", "blue"]
POOL_LAYER = "pool"  # GlobalAveragePooling2D in `genderclf.model.backbones.build_model`
FORMAT = 1


class ReferenceError(GenderclfError):
    """The reference statistics are missing, unreadable or from another format."""


def image_features(width: int, height: int, fitted: np.ndarray) -> np.ndarray:
    """The simple statistics of one image: its original size, and on the model input
    (RGB 0..255) the brightness (mean luma), contrast (luma standard deviation),
    saturation (mean HSV saturation) and the mean of each channel, all in 0..1."""
    rgb = fitted.astype(np.float32) / 255.0
    luma = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    hi, lo = rgb.max(axis=-1), rgb.min(axis=-1)
    sat = np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-6), 0.0)
    means = rgb.reshape(-1, 3).mean(axis=0)
    return np.array([width, height, luma.mean(), luma.std(), sat.mean(), *means], dtype=np.float32)


@dataclass
class Profile:
    """One row per usable image; `failed` lists the files that could not be used."""

    names: list[str]
    features: np.ndarray  # (n, len(FEATURES))
    embeddings: np.ndarray  # (n, d): the pooled layer
    p_male: np.ndarray  # (n,) calibrated P(male)
    male: np.ndarray  # (n,) 1 where the model says male (its own threshold)
    failed: list[tuple[str, str]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def confidence(self) -> np.ndarray:
        """The calibrated probability of the label the model gives."""
        return np.where(self.male == 1, self.p_male, 1.0 - self.p_male)

    def save(self, path: Path) -> Path:
        """Write the profile as one `.npz`, atomically; the same profile gives the same bytes."""
        meta = {**self.meta, "format": FORMAT, "features": FEATURES, "failed": self.failed}
        with atomic_file(path) as tmp:
            with tmp.open("wb") as fh:
                np.savez_compressed(
                    fh,
                    names=np.array(self.names, dtype=str),
                    features=self.features.astype(np.float32),
                    embeddings=self.embeddings.astype(np.float16),
                    p_male=self.p_male.astype(np.float32),
                    male=self.male.astype(np.int8),
                    meta=np.array(json.dumps(meta)),
                )
            reproducible_zip(tmp)  # NumPy dates each member: same profile, same bytes
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], what: str = "") -> Profile:
        """Read a saved profile.

        Raises:
            ReferenceError: missing, not a profile, or written by another format version.
        """
        where = what or str(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if meta.get("format") != FORMAT or meta.get("features") != FEATURES:
                    raise ReferenceError(
                        f"{where}: reference statistics of another genderclf "
                        "version: re-run `dvc repro evaluate register`"
                    )
                return cls(
                    [str(n) for n in z["names"]],
                    z["features"].astype(np.float64),
                    z["embeddings"].astype(np.float32),
                    z["p_male"].astype(np.float64),
                    z["male"].astype(int),
                    [tuple(f) for f in meta.pop("failed", [])],
                    meta,
                )
        except FileNotFoundError:
            raise ReferenceError(
                f"{where}: no reference statistics there: run `dvc repro evaluate`"
            ) from None
        except (OSError, ValueError, KeyError) as err:
            raise ReferenceError(
                f"{where}: not readable as reference statistics ({err}): "
                "re-run `dvc repro evaluate`"
            ) from None


Source = str | os.PathLike[str] | bytes | Callable[[], bytes]


def embedding_model(clf: Classifier) -> Any:
    """The classifier's model with two outputs: the pooled layer and P(male).

    Raises:
        ReferenceError: the model has no `pool` layer (not built by genderclf).
    """
    import keras

    try:
        pool = clf.model.get_layer(POOL_LAYER)
    except ValueError:
        raise ReferenceError(
            f"{clf.source or 'the model'} has no {POOL_LAYER!r} layer: drift "
            "checks need a model built by genderclf"
        ) from None
    return keras.Model(clf.model.inputs, [pool.output, clf.model.outputs[0]])


def profile(
    sources: Iterable[tuple[str, Source]],
    clf: Classifier,
    max_pixels: int,
    batch_size: int,
    meta: dict[str, Any] | None = None,
) -> Profile:
    """Open, fit, describe and score each image; a file that cannot be used is listed in
    `failed` with the reason and the others go on.

    Args:
        sources: (name, path | bytes | a function returning bytes) pairs.
        clf: the classifier (its image size, resize mode, threshold, calibration).
        max_pixels: refuse bigger images (`predict.max_pixels`).
        batch_size: images per model call.
    """
    import keras

    model = embedding_model(clf)
    names: list[str] = []
    feats: list[np.ndarray] = []
    embs: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    failed: list[tuple[str, str]] = []
    pending: list[np.ndarray] = []

    def flush() -> None:
        if pending:
            emb, p = model.predict_on_batch(np.stack(pending))
            embs.append(np.asarray(keras.ops.convert_to_numpy(emb), dtype=np.float32))
            probs.append(np.asarray(keras.ops.convert_to_numpy(p), dtype=np.float64).reshape(-1))
            pending.clear()

    for name, source in sources:
        try:
            im = open_rgb(source() if callable(source) else source, max_pixels)
        except ImageError as err:
            failed.append((name, f"{err.reason}: {err}"))
            continue
        fitted = np.asarray(clf.fit(im), dtype=np.float32)
        names.append(name)
        feats.append(image_features(im.width, im.height, fitted))
        pending.append(fitted)
        if len(pending) >= batch_size:
            flush()
    flush()
    raw = np.concatenate(probs) if probs else np.zeros(0)
    dim = embs[0].shape[1] if embs else 0
    return Profile(
        names,
        np.stack(feats) if feats else np.zeros((0, len(FEATURES))),
        np.concatenate(embs) if embs else np.zeros((0, dim), dtype=np.float32),
        clf.config.calibrate(raw),
        (raw >= clf.config.threshold).astype(int),
        failed,
        dict(meta or {}),
    )
