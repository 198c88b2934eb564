"""The stages run on folders of a test's choosing (the stage contract takes a `Paths`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from genderclf.config import Paths, Settings


def download(settings: Settings, raw: Path, progress: bool = False) -> dict[str, Any]:
    """The download stage into `raw`; returns the SOURCE.json record."""
    from genderclf.stages import download as stage

    return stage.run(settings, Paths(raw=Path(raw)), progress=progress).record


def augment(settings: Settings, raw: Path, splits: Path, out: Path,
            progress: bool = False) -> dict[str, Any]:  # fmt: skip
    """The augment stage from `raw` + `splits` into `out`; returns meta.json's content."""
    from genderclf.stages import augment as stage

    paths = Paths(raw=Path(raw), splits=Path(splits), prepared=Path(out),
                  augment_preview=Path(out).parent / "augment_preview.png")  # fmt: skip
    return stage.run(settings, paths, progress=progress).meta


def validate(settings: Settings, raw: Path, out: Path, progress: bool = False) -> dict[str, Any]:
    """The validate stage on `raw`, writing the manifest and reports below `out`
    (the standard layout there); returns the summary (metrics/validation.json)."""
    from genderclf.stages import validate as stage

    paths = replace(Paths().under(out), raw=Path(raw))
    return stage.run(settings, paths, progress=progress).summary


def register(settings: Settings, run_file: Path, eval_file: Path, prepared: Path,
             report: Path) -> dict[str, Any]:  # fmt: skip
    """`genderclf register` on these files (the configured MLflow registry)."""
    from genderclf.cli import run_register

    return run_register(settings, Paths(run=Path(run_file), eval_metrics=Path(eval_file),
                                        prepared=Path(prepared), register_report=Path(report)))  # fmt: skip


def train(settings: Settings, prepared: Path, params: Path, source_file: Path) -> dict[str, Any]:
    """`genderclf train` on `prepared` (outputs relative to the cwd); returns train.json."""
    from genderclf.cli import run_train

    paths = Paths(params=Path(params), raw=Path(source_file).parent, prepared=Path(prepared))
    return run_train(settings, paths).metrics


def evaluate(settings: Settings, prepared: Path, splits: Path) -> dict[str, Any]:
    """`genderclf evaluate` (model and outputs relative to the cwd); returns eval.json."""
    from genderclf.cli import run_evaluate

    return run_evaluate(settings, Paths(prepared=Path(prepared), splits=Path(splits))).metrics


def log_model_run(model: Any, image_size: int) -> dict[str, Any]:
    """A new MLflow run holding `model` as the train stage logs it (a LoggedModel with an
    input example); returns the keys of models/run.json that point at it."""
    import mlflow
    import numpy as np

    from genderclf.tracking.runs import log_keras_model
    from genderclf.tracking.setup import configure

    configure(0)
    example = np.random.default_rng(0).uniform(0, 255, (1, image_size, image_size, 3))
    with mlflow.start_run() as run:
        info = log_keras_model(model, example)
    return {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
            "keras_model_uri": info.model_uri, "model_id": info.model_id}  # fmt: skip
