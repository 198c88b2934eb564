"""The stages run on folders of a test's choosing (the stage contract takes a `Paths`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from genderclf.config import Paths, Settings
from genderclf.contracts import PreparedData


def download(settings: Settings, raw: Path, progress: bool = False) -> dict[str, Any]:
    """The download stage into `raw`; returns the SOURCE.json record."""
    from genderclf.stages import download as stage

    return stage.run(settings, Paths(raw=Path(raw)), progress=progress).record


def augment(
    settings: Settings, raw: Path, splits: Path, out: Path, progress: bool = False
) -> PreparedData:
    """The augment stage from `raw` + `splits` into `out`; returns what meta.json holds."""
    from genderclf.stages import augment as stage

    paths = Paths(
        raw=Path(raw),
        splits=Path(splits),
        prepared=Path(out),
        augment_preview=Path(out).parent / "augment_preview.png",
    )
    return stage.run(settings, paths, progress=progress).data


def validate(settings: Settings, raw: Path, out: Path, progress: bool = False) -> dict[str, Any]:
    """The validate stage on `raw`, writing the manifest and reports below `out`
    (the standard layout there); returns the summary (metrics/validation.json)."""
    from genderclf.stages import validate as stage

    paths = replace(Paths().under(out), raw=Path(raw))
    return stage.run(settings, paths, progress=progress).summary


def register(
    settings: Settings,
    run_file: Path,
    eval_file: Path,
    prepared: Path,
    report: Path,
    splits: Path | None = None,
    plots: Path | None = None,
) -> dict[str, Any]:
    """`genderclf register` on these files (the configured MLflow registry); returns what
    register.json holds. The trained model's model.json is next to `run_file` (run.json,
    see `log_model_run`); the evaluate stage's per-image answers (predictions.csv) are in
    `plots` (default: next to `eval_file`); the model card goes next to `report`."""
    from genderclf.pipeline import run_register

    return run_register(
        settings,
        Paths(
            model_info=Path(run_file).with_name("model.json"),
            run=Path(run_file),
            eval_metrics=Path(eval_file),
            plots=Path(plots or Path(eval_file).parent),
            prepared=Path(prepared),
            register_report=Path(report),
            model_card=Path(report).with_name("model_card.md"),
            **({"splits": Path(splits)} if splits else {}),
        ),
    ).decision.to_json()


def write_evaluation(
    folder: Path,
    names: list[str],
    y: Any,
    accuracy: float | None = None,
    threshold: float = 0.5,
    pred: Any = None,
    plots: Path | None = None,
    prob: Any = None,
) -> float:
    """eval.json and predictions.csv as the evaluate stage writes them: for a candidate
    that answers `accuracy` of these test images right (the first ones), or gave the
    answers `pred` (with the probabilities `prob`, else 0.9 / 0.1). Returns the accuracy."""
    import numpy as np
    import pandas as pd

    from genderclf.contracts import Calibration, Evaluation
    from genderclf.model.scoring import expected_calibration_error

    y = np.asarray(y, dtype=int)
    if pred is None:
        pred = np.where(np.arange(len(y)) < round(accuracy * len(y)), y, 1 - y)
    pred = np.asarray(pred, dtype=int)
    right = int((pred == y).sum())
    names_ = np.array(["female", "male"])
    plots = Path(plots or folder)
    for d in (folder, plots):
        d.mkdir(parents=True, exist_ok=True)
    prob = np.where(pred == 1, 0.9, 0.1) if prob is None else np.asarray(prob, dtype=float)
    pd.DataFrame(
        {"path": names, "actual": names_[y], "predicted": names_[pred], "prob_male": prob}
    ).to_csv(plots / "predictions.csv", index=False)
    ece = expected_calibration_error(y, prob, 10)[0]  # as evaluate records it
    Evaluation(
        accuracy=right / len(y),
        precision=0.5,
        recall=0.5,
        f1=0.5,
        roc_auc=None,
        average_precision=None,
        ece=ece,
        n=len(y),
        confusion_matrix=[[0, 0], [0, 0]],
        threshold_rule="fixed",
        threshold_calibrated=0.5,
        threshold_raw=threshold,
        calibration=Calibration("none", 1.0, 0.0, ece),
        val_accuracy_at_threshold=right / len(y),
        accuracy_ci=None,
        f1_ci=None,
        roc_auc_ci=None,
    ).write(folder / "eval.json")
    return right / len(y)


def train(settings: Settings, prepared: Path, params: Path, source_file: Path) -> dict[str, Any]:
    """`genderclf train` on `prepared` (outputs relative to the cwd); returns train.json."""
    from genderclf.pipeline import run_train

    paths = Paths(params=Path(params), raw=Path(source_file).parent, prepared=Path(prepared))
    return run_train(settings, paths).metrics


def evaluate(
    settings: Settings, prepared: Path, splits: Path, raw: Path | None = None
) -> dict[str, Any]:
    """`genderclf evaluate` (model and outputs relative to the cwd); returns what eval.json
    holds. `raw` holds the SOURCE.json the test dataset's MLflow record names (default:
    none)."""
    from genderclf.pipeline import run_evaluate

    paths = Paths(prepared=Path(prepared), splits=Path(splits))
    paths = paths if raw is None else replace(paths, raw=Path(raw))
    return run_evaluate(settings, paths).evaluation.to_json()


def log_model_run(model: Any, settings: Settings, folder: Path) -> dict[str, Any]:
    """`model` as the train stage leaves it (trained with `settings`), in `folder`:
    model.keras, model.json (its TrainedModel), a new MLflow run holding it (a LoggedModel
    with an input example, tagged with the model's hash) and run.json naming that run;
    returns run.json's content."""
    import mlflow
    import numpy as np

    from genderclf.contracts import ModelInput, TrainedModel, TrainingRun
    from genderclf.io import md5_file
    from genderclf.model.saving import save_model
    from genderclf.tracking.runs import KERAS_MODEL_ID_TAG, MODEL_MD5_TAG, log_keras_model
    from genderclf.tracking.setup import configure

    folder = Path(folder)
    image_size = settings.base.image_size
    keras_file = save_model(model, folder / "model.keras")
    md5 = md5_file(keras_file)
    TrainedModel(
        ModelInput(image_size, settings.augment.resize),
        md5,
        settings.base.seed,
        settings.train.model_dump(),
    ).write(folder / "model.json")
    uri = configure(0)
    example = np.random.default_rng(0).uniform(0, 255, (1, image_size, image_size, 3))
    with mlflow.start_run() as run:
        info = log_keras_model(model, example)
        mlflow.set_tags({MODEL_MD5_TAG: md5, KERAS_MODEL_ID_TAG: info.model_id})
    record = TrainingRun(
        model_md5=md5,
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        tracking_uri=uri,
        keras_model_uri=info.model_uri,
        model_id=info.model_id,
    )
    record.write(folder / "run.json")
    return record.to_json()


def register_champion(
    params: dict[str, Any], raw: Path, splits: Path, prepared: Path, seed: int = 3
) -> Path:
    """A small CNN made champion through the real evaluate and register stages (in the
    configured MLflow store, outputs relative to the cwd), so it carries the reference
    statistics of `genderclf drift`. Writes `params` to ./params.yaml; returns that path."""
    import keras
    import yaml

    from genderclf.config import load_settings
    from genderclf.model.backbones import build_model
    from genderclf.pipeline import run_evaluate, run_register

    file = Path("params.yaml")
    file.write_text(yaml.safe_dump(params, sort_keys=False))
    settings = load_settings(file)
    keras.utils.set_random_seed(seed)
    paths = Paths(raw=Path(raw), splits=Path(splits), prepared=Path(prepared))
    log_model_run(
        build_model(settings.train, settings.base.image_size), settings, paths.model.parent
    )
    run_evaluate(settings, paths)
    decision = run_register(settings, paths).decision
    assert decision.decision == "promoted" and paths.reference.is_file(), decision
    return file


def count_reads(monkeypatch: Any, contract: type) -> list[Any]:
    """Record every `contract.read(path)` from now on (the reads still happen); returns the
    list the paths are appended to."""
    reads: list[Any] = []
    real = contract.read.__func__

    def read(cls: type, path: Any) -> Any:
        reads.append(path)
        return real(cls, path)

    monkeypatch.setattr(contract, "read", classmethod(read))
    return reads


def copy_images(names: list[str], raw: Path, dest: Path, darken: float = 1.0) -> Path:
    """The raw images `names` as JPEGs in `dest` (multiplied by `darken`: a shifted batch)."""
    import numpy as np
    from PIL import Image

    dest.mkdir(parents=True)
    for n in names:
        im = Image.open(Path(raw) / n).convert("RGB")
        if darken != 1.0:
            im = Image.fromarray((np.asarray(im, dtype=np.float32) * darken).astype(np.uint8))
        im.save(dest / Path(n).name, quality=95)
    return dest
