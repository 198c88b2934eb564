"""Saving and loading the Keras model: reproducible atomic saves, loads with safe mode on."""

from __future__ import annotations

import contextlib
import json
import zipfile
from pathlib import Path
from typing import Any

from genderclf.config import GenderclfError
from genderclf.io import atomic_file, reproducible_zip


class ModelLoadError(GenderclfError, ValueError):
    """A model file that is not a loadable (safe) Keras model."""


def _safe_mode():
    """Force Keras safe mode on for one load.

    `load_model(safe_mode=True)` alone is not enough: once anything in the process has
    called `keras.config.enable_unsafe_deserialization()`, Keras 3 lets that global switch
    override the argument and would run a lambda's bytecode from the file.
    """
    try:
        from keras.src.saving.serialization_lib import SafeModeScope
    except ImportError:  # pragma: no cover - a Keras without it: the argument alone
        return contextlib.nullcontext()
    return SafeModeScope(True)


def _reproducible_member(name: str, data: bytes) -> bytes:
    """A member of a `.keras` archive without what changes from one save to the next."""
    if name == "metadata.json":  # {"keras_version": ..., "date_saved": "2026-...@..."}
        meta = json.loads(data)
        meta.pop("date_saved", None)
        return json.dumps(meta).encode()
    if name == "config.json":
        # Keras marks objects that several layers share (their dtype policy) with the
        # object's memory address, `shared_object_id`: numbered in order of appearance
        # instead, the same objects stay shared on loading.
        config = json.loads(data)
        _renumber_shared(config, {})
        return json.dumps(config).encode()
    return data


def _renumber_shared(node: Any, ids: dict[Any, int]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "shared_object_id":
                node[key] = ids.setdefault(value, len(ids))
            else:
                _renumber_shared(value, ids)
    elif isinstance(node, list):
        for value in node:
            _renumber_shared(value, ids)


def save_model(model: Any, path: str | Path) -> Path:
    """Save a Keras model as a `.keras` file atomically (temp file + rename).

    The same model gives the same bytes: Keras stamps the archive's members with the
    current time, `metadata.json` with a save date and `config.json` with memory
    addresses; all are rewritten before the rename (so `dvc repro` of an identical
    training leaves the model's hash as it was).
    """
    with atomic_file(path) as tmp:
        model.save(str(tmp))
        reproducible_zip(tmp, _reproducible_member)
    return Path(path)


def load_model(path: str | Path):
    """Load a `.keras` model with Keras' safe mode on.

    Raises:
        FileNotFoundError: no such file.
        ModelLoadError: the file is not a Keras model or needs unsafe deserialization.
    """
    import keras

    import genderclf.model.layers  # noqa: F401  (registers the custom layers)

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `dvc repro train`")
    if not zipfile.is_zipfile(path):  # Keras would say "File not found" for a file that exists
        raise ModelLoadError(
            f"{path} is not a loadable Keras model: not a .keras (zip) file; run `dvc repro train`"
        )
    try:
        with _safe_mode():
            return keras.saving.load_model(str(path), safe_mode=True)
    except Exception as err:  # Keras raises many types for a bad file; one clear message
        if "safe_mode" in str(err):
            raise ModelLoadError(
                f"{path} was refused: loading it needs unsafe deserialization (Python code "
                "such as a lambda layer), which Keras safe mode forbids. Nothing was executed; "
                "re-train with `dvc repro train` rather than loading an untrusted model."
            ) from None
        raise ModelLoadError(f"{path} is not a loadable Keras model: {err}") from None
