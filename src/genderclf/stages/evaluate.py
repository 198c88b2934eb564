"""The evaluate stage: the model on the test split, threshold chosen on validation.

Writes `metrics/eval.json` (`contracts.Evaluation`: accuracy, precision, recall, F1,
ROC-AUC, the threshold on both scales, calibration, slices) and the plots in `plots/`;
`genderclf.tracking` logs both into the training run. Also `reports/reference.npz`: what
the model sees on a seeded sample of the test split's images (image statistics,
embeddings, predictions), the reference of `genderclf drift`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from genderclf.config import Paths, Settings
from genderclf.contracts import (
    Calibration,
    ContractError,
    Evaluation,
    PreparedData,
    TrainedModel,
)
from genderclf.data.split import read_split
from genderclf.inference import Classifier, ServingConfig
from genderclf.io import md5_file
from genderclf.model.plots import mistakes_grid, write_plots, write_predictions
from genderclf.model.saving import load_model
from genderclf.model.scoring import (
    choose_threshold,
    compute_metrics,
    expected_calibration_error,
    predict_split,
    slice_metrics,
)
from genderclf.model.stats import Platt, fit_platt, metric_intervals
from genderclf.monitor.profile import profile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateReport:
    evaluation: Evaluation  # what metrics/eval.json holds
    plots: list[Path]
    model: TrainedModel  # the model evaluated (models/model.json)


def operating_point(mode: str, yv: np.ndarray, pv: np.ndarray) -> tuple[Platt, float]:
    """The calibration and the cut on calibrated P(male) that `evaluate.threshold` asks for.

    * `calibrated`: Platt scaling fitted on the validation split, cut at 0.5 (two
      parameters: it holds on a few hundred validation images);
    * `val_f1`: no calibration, the cut that maximises F1 on validation (on a small
      validation split it chases noise; kept for comparison);
    * `fixed`: no calibration, 0.5.
    """
    if mode == "calibrated":
        return fit_platt(yv, pv), 0.5
    if mode == "val_f1":
        return Platt(), choose_threshold(yv, pv)
    return Platt(), 0.5


def trained_model(paths: Paths) -> TrainedModel:
    """models/model.json, checked against the model file it describes.

    Raises:
        ContractError: model.json missing, of another version, or describing another
            model file than models/model.keras.
    """
    trained = TrainedModel.read(paths.model_info)
    if paths.model.is_file() and md5_file(paths.model) != trained.model_md5:
        raise ContractError(
            f"{paths.model_info} describes another model than {paths.model} (md5 "
            f"{trained.model_md5}): run `dvc checkout train` or `dvc repro train`"
        )
    return trained


def run(settings: Settings, paths: Paths) -> EvaluateReport:
    """Score the model on val (calibration, operating point) and on test; write metrics,
    95% intervals, slices and plots.

    Probabilities in the report and plots are calibrated: `threshold_calibrated` is the cut
    on them, `threshold_raw` the same cut on the model's raw output (what the served
    model applies).

    Raises:
        FileNotFoundError / ModelLoadError: the model is missing or not loadable.
        ContractError: models/model.json or the prepared data missing or stale (names the
            stage to run).
    """
    cfg, seed = settings.evaluate, settings.base.seed
    trained = trained_model(paths)
    data = PreparedData.read(paths.prepared)
    model = load_model(paths.model)
    batch = settings.train.batch_size * 2
    _, yv, pv_raw = predict_split(model, data, "val", batch)
    platt, cut = operating_point(cfg.threshold, yv, pv_raw)
    names, y, p_raw = predict_split(model, data, "test", batch)
    p, pv = platt.apply(p_raw), platt.apply(pv_raw)
    m = compute_metrics(y, p, cut, cfg.calibration_bins)
    ci = metric_intervals(y, p, cut, cfg.bootstrap_samples, seed)
    frame = read_split(paths.splits, "test").set_index("path").reindex(names)
    correct = ((p >= cut).astype(int) == y).astype(float)
    slices = (
        slice_metrics(frame, correct, list(cfg.slices), cfg.min_slice_n)
        if any(a in frame.columns for a in cfg.slices)
        else None
    )
    evaluation = Evaluation(
        accuracy=m["accuracy"],
        precision=m["precision"],
        recall=m["recall"],
        f1=m["f1"],
        roc_auc=m["roc_auc"],
        average_precision=m["average_precision"],
        ece=m["ece"],
        n=m["n"],
        confusion_matrix=m["confusion_matrix"],
        threshold_rule=cfg.threshold,
        threshold_calibrated=cut,
        threshold_raw=platt.raw_threshold(cut) if cfg.threshold == "calibrated" else cut,
        calibration=Calibration(
            method="platt" if cfg.threshold == "calibrated" else "none",
            a=platt.a,
            b=platt.b,
            ece_raw=expected_calibration_error(y, p_raw, cfg.calibration_bins)[0],
        ),
        val_accuracy_at_threshold=float(((pv >= cut).astype(int) == yv).mean()),
        accuracy_ci=ci["accuracy"],
        f1_ci=ci["f1"],
        roc_auc_ci=ci["roc_auc"],
        slices=slices,
        worst_slice_gap=slices["worst_slice_gap"] if slices else None,
    )
    _, calib = expected_calibration_error(y, p, cfg.calibration_bins)
    plots = write_plots(y, p, m, calib, slices, paths.plots, evaluation.threshold_raw)
    shown = mistakes_grid(data, names, y, p, cut, cfg.mistakes_grid, paths.plots / "mistakes.png")
    plots.append(paths.plots / "mistakes.png")
    write_predictions(names, y, p, cut, paths.plots / "predictions.csv")
    write_reference(settings, paths, model, ServingConfig.of(trained.input, evaluation))
    evaluation.write(paths.eval_metrics)
    log.debug("evaluate: %d test images, %d mistakes shown", len(y), shown)  # CLI says it
    return EvaluateReport(evaluation, plots, trained)


def write_reference(settings: Settings, paths: Paths, model: Any, config: ServingConfig) -> Path:
    """`reports/reference.npz`: the model's profile of `drift.reference_images` test images
    (a seeded sample), read from the raw files the way `genderclf drift` reads a batch
    (`config`: the model's serving config, as it will be registered).

    Raises:
        FileNotFoundError: the test split or the raw folder is missing.
    """
    test = read_split(paths.splits, "test")
    n = min(settings.drift.reference_images, len(test))
    rows = np.sort(np.random.default_rng(settings.base.seed).choice(len(test), n, replace=False))
    names = test["path"].iloc[rows].tolist()
    if names and not (paths.raw / names[0]).is_file():
        raise FileNotFoundError(
            f"{paths.raw / names[0]} not found: the reference statistics are "
            f"read from the raw test images (run `dvc repro download`)"
        )
    prof = profile(
        [(p, paths.raw / p) for p in names],
        Classifier(model, config, str(paths.model)),
        settings.predict.max_pixels,
        settings.train.batch_size * 2,
        {"source": "test split", "split_size": len(test)},
    )
    return prof.save(paths.reference)
