"""The real params.yaml, shrunk: "shrink, don't mock"."""

from __future__ import annotations

import copy
from typing import Any

import yaml
from tests.helpers import REPO_ROOT

from genderclf.config import set_dotted

# Dotted keys of params.yaml and the tiny values tests use. Keys that only change speed
# (`workers`) are set to 1 so that tests do not spawn process pools unless they mean to.
TINY = {
    "base.image_size": 32,
    "data.sample.num_images": 120,
    "data.sample.images_per_identity": 4,
    "data.sample.workers": 1,
    "data.kaggle.backoff_seconds": 0.01,
    "data.kaggle.retries": 2,
    "data.s3.retries": 0,
    "validate.min_rows": 10,
    "validate.workers": 1,
    "augment.shard_size": 16,
    "augment.workers": 1,
}

# On top of TINY, what a whole-pipeline run needs to be quick: the small CNN for one epoch
# per phase, and no quality floor or calibration ceiling (these runs test plumbing, not
# model quality: a one-epoch model on 160 images is badly calibrated).
PIPELINE = {
    "data.sample.num_images": 160,
    "augment.copies": 0,
    "train.backbone": "simple_cnn",
    "train.weights": None,
    "train.batch_size": 32,
    "train.epochs_head": 1,
    "train.epochs_finetune": 1,
    "register.min_accuracy": 0.0,
    "register.max_ece": 1.0,
}


# What the model-stage tests shrink on top of TINY. Split by person (`group`), so held-out
# accuracy is on faces of people the model never saw.
MODEL_TINY: dict[str, Any] = {
    "data.sample.num_images": 600,
    "data.sample.images_per_identity": 4,
    "split.strategy": "group",
    "split.val_fraction": 0.2,
    "split.test_fraction": 0.2,
    "augment.copies": 0,
    "augment.shard_size": 64,
    "train.backbone": "simple_cnn",
    "train.weights": None,
    "train.batch_size": 16,
    "train.epochs_head": 1,
    "train.epochs_finetune": 1,
    "train.mixed_precision": "off",
    "register.retries": 0,
}

# On top of MODEL_TINY, for the drift tests: the champion clears the gate whatever its
# accuracy (they are about drift, not quality), small batches are enough.
DRIFT_CHAMPION: dict[str, Any] = {
    **MODEL_TINY,
    "register.min_accuracy": 0.0,
    "register.alpha": None,
    "register.max_slice_drop": 1.0,
    "register.max_ece": 1.0,
    "register.serving_check_images": 0,
    "drift.min_images": 30,
    "drift.permutations": 200,
}


def real_params() -> dict[str, Any]:
    """The repository's params.yaml as a dict."""
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))


def shrink(raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A deep copy of the params dict with the TINY values and then `overrides` applied."""
    out = copy.deepcopy(raw)
    for k, v in {**TINY, **(overrides or {})}.items():
        set_dotted(out, k, v)
    return out


def pipeline_params(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Tiny params for a whole `dvc repro` / flow run (TINY + PIPELINE + overrides)."""
    return shrink(real_params(), {**PIPELINE, **(overrides or {})})
