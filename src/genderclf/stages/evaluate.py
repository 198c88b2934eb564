"""The evaluate stage: the model on the test split, threshold chosen on validation.

Writes `metrics/eval.json` (accuracy, precision, recall, F1, ROC-AUC, calibration, slices)
and the plots in `plots/`; `genderclf.tracking` logs both into the training run. Also
`reports/reference.npz`: what the model sees on a seeded sample of the test split's images
(image statistics, embeddings, predictions), the reference of `genderclf drift`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from genderclf.config import Paths, Settings
from genderclf.data.split import read_split
from genderclf.inference import Classifier, ServingConfig
from genderclf.io import write_json
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
    metrics: dict[str, Any]  # what metrics/eval.json holds
    plots: list[Path]


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


def run(settings: Settings, paths: Paths) -> EvaluateReport:
    """Score the model on val (calibration, operating point) and on test; write metrics,
    95% intervals, slices and plots.

    Probabilities in the report and plots are calibrated; `threshold` in eval.json is the
    equivalent cut on the model's raw output (what the served model applies).

    Raises:
        FileNotFoundError / ModelLoadError: the model is missing or not loadable.
        PreparedDataError: prepared data missing.
    """
    cfg, seed = settings.evaluate, settings.base.seed
    model = load_model(paths.model)
    batch = settings.train.batch_size * 2
    _, yv, pv_raw = predict_split(model, paths.prepared, "val", batch)
    platt, cut = operating_point(cfg.threshold, yv, pv_raw)
    names, y, p_raw = predict_split(model, paths.prepared, "test", batch)
    p, pv = platt.apply(p_raw), platt.apply(pv_raw)
    m = compute_metrics(y, p, cut, cfg.calibration_bins)
    m["threshold"] = platt.raw_threshold(cut) if cfg.threshold == "calibrated" else cut
    m["calibration"] = {
        "method": "platt" if cfg.threshold == "calibrated" else "none",
        "a": platt.a,
        "b": platt.b,
        "cut": cut,
        "ece_raw": expected_calibration_error(y, p_raw, cfg.calibration_bins)[0],
    }
    m["val_accuracy_at_threshold"] = float(((pv >= cut).astype(int) == yv).mean())
    for k, ci in metric_intervals(y, p, cut, cfg.bootstrap_samples, seed).items():
        m[f"{k}_ci"] = ci
    frame = read_split(paths.splits, "test").set_index("path").reindex(names)
    correct = ((p >= cut).astype(int) == y).astype(float)
    slices = (
        slice_metrics(frame, correct, list(cfg.slices), cfg.min_slice_n)
        if any(a in frame.columns for a in cfg.slices)
        else None
    )
    if slices:
        m["slices"] = slices
        m["worst_slice_gap"] = slices["worst_slice_gap"]
    _, calib = expected_calibration_error(y, p, cfg.calibration_bins)
    plots = write_plots(y, p, m, calib, slices, paths.plots)
    shown = mistakes_grid(
        paths.prepared, names, y, p, cut, cfg.mistakes_grid, paths.plots / "mistakes.png"
    )
    plots.append(paths.plots / "mistakes.png")
    write_predictions(names, y, p, cut, paths.plots / "predictions.csv")
    write_reference(settings, paths, model, m["threshold"], platt)
    write_json(paths.eval_metrics, m)
    log.debug("evaluate: %d test images, %d mistakes shown", len(y), shown)  # CLI says it
    return EvaluateReport(m, plots)


def write_reference(
    settings: Settings, paths: Paths, model: Any, threshold: float, platt: Platt
) -> Path:
    """`reports/reference.npz`: the model's profile of `drift.reference_images` test images
    (a seeded sample), read from the raw files the way `genderclf drift` reads a batch.

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
    config = ServingConfig(
        int(model.inputs[0].shape[1]), settings.augment.resize, threshold, None, (platt.a, platt.b)
    )
    prof = profile(
        [(p, paths.raw / p) for p in names],
        Classifier(model, config, str(paths.model)),
        settings.predict.max_pixels,
        settings.train.batch_size * 2,
        {"source": "test split", "split_size": len(test)},
    )
    return prof.save(paths.reference)
