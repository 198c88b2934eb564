"""Scoring a model on a prepared split, and the metrics of its answers (scikit-learn).

The decision threshold is chosen on the validation split and applied to the test split,
so the test numbers are not tuned on the test data.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from genderclf.contracts import PreparedData


def slice_name(attribute: str, has: bool) -> str:
    """The one spelling of a slice, everywhere (eval.json, plots, card, gate, MLflow keys):
    `Heavy_Makeup:yes` / `Heavy_Makeup:no` (MLflow allows no `=` in a key)."""
    return f"{attribute}:{'yes' if has else 'no'}"


def predict_split(
    model: Any, prepared: PreparedData | str | os.PathLike[str], split: str, batch_size: int
):
    """Probabilities for one prepared split, in record order (originals only for val/test).

    Returns:
        (paths: list[str], labels: np.ndarray[int], probs: np.ndarray[float])
    """
    import keras

    from genderclf.data.tfrecords import make_dataset

    want = model.inputs[0].shape[1]
    paths, ys, ps = [], [], []
    for images, labels, p in make_dataset(prepared, split, batch_size, with_path=True):
        if images.shape[1] != want:  # e.g. a champion trained at another image size
            images = keras.ops.image.resize(images, (want, want))
        prob = model.predict_on_batch(images)
        ps.append(np.asarray(keras.ops.convert_to_numpy(prob)).reshape(-1))
        ys.append(np.asarray(labels).astype(int))
        paths.extend(x.decode() for x in np.asarray(p))
    return paths, np.concatenate(ys), np.concatenate(ps).astype(np.float64)


def choose_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The probability threshold that maximises F1 on (validation) data."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(y, p)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    if len(thresholds) == 0:
        return 0.5
    return float(thresholds[int(np.argmax(f1[:-1]))])


def expected_calibration_error(
    y: np.ndarray, p: np.ndarray, bins: int
) -> tuple[float, pd.DataFrame]:
    """ECE over equal-width probability bins; also the per-bin table for the plot."""
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            conf, acc = float(p[m].mean()), float(y[m].mean())
            ece += m.mean() * abs(conf - acc)
            rows.append({"bin": b, "confidence": conf, "observed": acc, "count": int(m.sum())})
    return float(ece), pd.DataFrame(rows)


def compute_metrics(
    y: np.ndarray, p: np.ndarray, threshold: float, bins: int = 10
) -> dict[str, Any]:
    from sklearn import metrics as M

    pred = (p >= threshold).astype(int)
    both = len(np.unique(y)) > 1
    ece, _ = expected_calibration_error(y, p, bins)
    return {
        "accuracy": float(M.accuracy_score(y, pred)),
        "precision": float(M.precision_score(y, pred, zero_division=0)),
        "recall": float(M.recall_score(y, pred, zero_division=0)),
        "f1": float(M.f1_score(y, pred, zero_division=0)),
        "roc_auc": float(M.roc_auc_score(y, p)) if both else None,
        "average_precision": float(M.average_precision_score(y, p)) if both else None,
        "ece": ece,
        "threshold": float(threshold),
        "confusion_matrix": M.confusion_matrix(y, pred, labels=[0, 1]).tolist(),
        "n": len(y),
    }


def slice_metrics(
    frame: pd.DataFrame, correct: np.ndarray, attrs: list[str], min_n: int
) -> dict[str, Any]:
    """Accuracy with and without each attribute, its Wilson interval, and the worst slice.

    A slice of fewer than `min_n` images is reported (flagged `too_small`) but left out of
    the worst slice: a handful of images ranks nothing.

    Returns:
        {"by_attribute": {attr: {"with": {"n", "accuracy", "ci", "too_small"}, "without":
         {...}}}, "min_n": min_n, "worst_slice": name, "worst_slice_accuracy": acc,
         "worst_slice_gap": overall - worst}
    """
    from genderclf.model.stats import wilson

    overall = float(correct.mean())
    out: dict[str, Any] = {"by_attribute": {}, "min_n": min_n}
    worst = ("overall", overall)
    for a in attrs:
        if a not in frame.columns:
            continue
        col = pd.to_numeric(frame[a], errors="coerce").to_numpy()
        entry = {}
        for name, mask in (("with", col == 1), ("without", col == 0)):
            n = int(mask.sum())
            right = int(correct[mask].sum())
            acc = right / n if n else None
            entry[name] = {"n": n, "accuracy": acc, "ci": wilson(right, n), "too_small": n < min_n}
            if acc is not None and n >= min_n and acc < worst[1]:
                worst = (slice_name(a, name == "with"), acc)
        out["by_attribute"][a] = entry
    out["worst_slice"], out["worst_slice_accuracy"] = worst
    out["worst_slice_gap"] = overall - worst[1]
    return out
