"""The evaluate stage: the model on the test split, threshold chosen on validation.

Writes `metrics/eval.json` (accuracy, precision, recall, F1, ROC-AUC, calibration, slices)
and the plots in `plots/`; `genderclf.tracking` logs both into the training run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genderclf.config import Paths, Settings
from genderclf.data.split import read_split
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

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateReport:
    metrics: dict[str, Any]  # what metrics/eval.json holds
    plots: list[Path]


def run(settings: Settings, paths: Paths) -> EvaluateReport:
    """Score the model on val (to pick the threshold) and on test; write metrics and plots.

    Raises:
        FileNotFoundError / ModelLoadError: the model is missing or not loadable.
        PreparedDataError: prepared data missing.
    """
    cfg = settings.evaluate
    model = load_model(paths.model)
    batch = settings.train.batch_size * 2
    _, yv, pv = predict_split(model, paths.prepared, "val", batch)
    threshold = choose_threshold(yv, pv) if cfg.threshold == "val_f1" else 0.5
    names, y, p = predict_split(model, paths.prepared, "test", batch)
    m = compute_metrics(y, p, threshold, cfg.calibration_bins)
    m["val_accuracy_at_threshold"] = float(((pv >= threshold).astype(int) == yv).mean())
    frame = read_split(paths.splits, "test").set_index("path").reindex(names)
    correct = ((p >= threshold).astype(int) == y).astype(float)
    slices = (slice_metrics(frame, correct, list(cfg.slices))
              if any(a in frame.columns for a in cfg.slices) else None)  # fmt: skip
    if slices:
        m["slices"] = slices
        m["worst_slice_gap"] = slices["worst_slice_gap"]
    _, calib = expected_calibration_error(y, p, cfg.calibration_bins)
    plots = write_plots(y, p, m, calib, slices, paths.plots)
    shown = mistakes_grid(paths.prepared, names, y, p, threshold, cfg.mistakes_grid,
                          paths.plots / "mistakes.png")  # fmt: skip
    plots.append(paths.plots / "mistakes.png")
    write_predictions(names, y, p, threshold, paths.plots / "predictions.csv")
    write_json(paths.eval_metrics, m)
    log.info("evaluate: %d test images, %d mistakes shown", len(y), shown)
    return EvaluateReport(m, plots)
