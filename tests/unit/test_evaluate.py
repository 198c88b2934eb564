"""The evaluation maths: threshold choice, calibration error, metrics and slices."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as M

from genderclf.model.scoring import (
    choose_threshold,
    compute_metrics,
    expected_calibration_error,
    slice_metrics,
)


def _f1_at(y: np.ndarray, p: np.ndarray, t: float) -> float:
    return float(M.f1_score(y, (p >= t).astype(int), zero_division=0))


# --- threshold --------------------------------------------------------------------------------


def test_threshold_separates_separable_scores():
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    p = np.array([0.05, 0.1, 0.2, 0.3, 0.35, 0.6, 0.9])
    t = choose_threshold(y, p)
    assert t == pytest.approx(0.35)  # the lowest positive score: F1 = 1
    assert _f1_at(y, p, t) == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_threshold_maximises_f1_over_every_candidate(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    p = np.clip(0.35 * y + rng.normal(0.35, 0.2, 300), 0, 1)  # overlapping classes
    t = choose_threshold(y, p)
    best = max(_f1_at(y, p, c) for c in np.unique(p))
    assert _f1_at(y, p, t) == pytest.approx(best)
    assert t in set(p)  # a threshold that actually occurs in the data


def test_threshold_is_not_fooled_by_the_class_prior():
    # Positives are rare and score low, but higher than every negative: a fixed 0.5
    # would call everything negative (F1 = 0); the chosen threshold finds them.
    y = np.array([0] * 90 + [1] * 10)
    p = np.concatenate([np.linspace(0.01, 0.2, 90), np.linspace(0.25, 0.4, 10)])
    t = choose_threshold(y, p)
    assert _f1_at(y, p, 0.5) == 0.0
    assert 0.2 < t <= 0.25
    assert _f1_at(y, p, t) == 1.0


# --- calibration ------------------------------------------------------------------------------


def test_ece_of_a_calibrated_model_is_small():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 200_000)
    y = (rng.uniform(0, 1, p.size) < p).astype(int)  # P(y=1 | p) = p exactly
    ece, table = expected_calibration_error(y, p, bins=10)
    assert ece < 0.01
    assert table["count"].sum() == p.size
    assert len(table) == 10
    np.testing.assert_allclose(table["observed"], table["confidence"], atol=0.02)


def test_ece_of_an_overconfident_model_is_large():
    rng = np.random.default_rng(1)
    truth = rng.choice([0.3, 0.7], 100_000)  # the real probability of male
    y = (rng.uniform(0, 1, truth.size) < truth).astype(int)
    p = np.where(truth > 0.5, 0.99, 0.01)  # claimed: near certainty
    ece, _ = expected_calibration_error(y, p, bins=10)
    assert ece == pytest.approx(0.29, abs=0.01)


def test_ece_by_hand_with_edge_probabilities():
    # bin 0 gets 0.0 and 0.2 (confidence 0.1, observed 0.5); bin 1 gets 0.8 and 1.0
    # (confidence 0.9, observed 1.0): ECE = 0.5 * 0.4 + 0.5 * 0.1
    y = np.array([0, 1, 1, 1])
    p = np.array([0.0, 0.2, 0.8, 1.0])
    ece, table = expected_calibration_error(y, p, bins=2)
    assert ece == pytest.approx(0.25)
    assert table.to_dict("list") == {
        "bin": [0, 1],
        "confidence": pytest.approx([0.1, 0.9]),
        "observed": pytest.approx([0.5, 1.0]),
        "count": [2, 2],
    }


# --- metrics ----------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.62])
def test_metrics_match_sklearn(threshold):
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 500)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, 500), 0, 1)
    p[:5] = threshold  # exactly at the threshold counts as male
    m = compute_metrics(y, p, threshold, bins=10)
    pred = (p >= threshold).astype(int)
    assert pred[:5].all()
    assert m["accuracy"] == pytest.approx(M.accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(M.precision_score(y, pred))
    assert m["recall"] == pytest.approx(M.recall_score(y, pred))
    assert m["f1"] == pytest.approx(M.f1_score(y, pred))
    assert m["roc_auc"] == pytest.approx(M.roc_auc_score(y, p))
    assert m["average_precision"] == pytest.approx(M.average_precision_score(y, p))
    assert m["confusion_matrix"] == M.confusion_matrix(y, pred, labels=[0, 1]).tolist()
    assert m["ece"] == pytest.approx(expected_calibration_error(y, p, 10)[0])
    assert m["threshold"] == threshold
    assert m["n"] == 500


def test_metrics_with_one_class_have_no_auc_instead_of_failing():
    y = np.ones(20, dtype=int)
    p = np.linspace(0.2, 0.9, 20)
    m = compute_metrics(y, p, 0.5)
    assert m["roc_auc"] is None
    assert m["average_precision"] is None
    assert m["recall"] == pytest.approx((p >= 0.5).mean())
    assert m["confusion_matrix"] == [[0, 0], [int((p < 0.5).sum()), int((p >= 0.5).sum())]]


# --- slices -----------------------------------------------------------------------------------


def _na(entry: dict) -> dict:
    """A slice entry's count and accuracy (the interval and flag are checked below)."""
    return {"n": entry["n"], "accuracy": entry["accuracy"]}


def test_slice_metrics_find_the_worst_slice_and_the_gap():
    # 20 test images: hats are hard (2 of 6 right); Young=0 is worse (0 of 3) but tiny.
    hat = [1] * 6 + [0] * 14
    glasses = [0] * 10 + [1] * 10
    young = [1] * 17 + [0] * 3
    correct = np.array([1, 1, 0, 0, 0, 0] + [1] * 11 + [0, 0, 0], dtype=float)
    frame = pd.DataFrame({"Wearing_Hat": hat, "Eyeglasses": glasses, "Young": young})

    s = slice_metrics(frame, correct, ["Wearing_Hat", "Eyeglasses", "Young", "Pale_Skin"], 5)

    overall = correct.mean()  # 13 / 20
    hat_slices = s["by_attribute"]["Wearing_Hat"]
    assert _na(hat_slices["with"]) == {"n": 6, "accuracy": pytest.approx(2 / 6)}
    assert _na(hat_slices["without"]) == {"n": 14, "accuracy": pytest.approx(11 / 14)}
    assert _na(s["by_attribute"]["Eyeglasses"]["with"]) == {"n": 10, "accuracy": pytest.approx(0.7)}
    assert _na(s["by_attribute"]["Eyeglasses"]["without"]) == {
        "n": 10,
        "accuracy": pytest.approx(0.6),
    }
    # Young=0 has the lowest accuracy, but slices under min_n=5 images are reported, not ranked
    assert _na(s["by_attribute"]["Young"]["without"]) == {"n": 3, "accuracy": 0.0}
    assert s["by_attribute"]["Young"]["without"]["too_small"] is True
    assert hat_slices["with"]["too_small"] is False
    lo, hi = hat_slices["with"]["ci"]  # Wilson, 2 of 6
    assert lo == pytest.approx(0.0968, abs=1e-3) and hi == pytest.approx(0.7000, abs=1e-3)
    assert "Pale_Skin" not in s["by_attribute"]  # not a column of this dataset
    assert s["worst_slice"] == "Wearing_Hat:yes"  # one spelling everywhere, MLflow's too
    assert s["worst_slice_accuracy"] == pytest.approx(2 / 6)
    assert s["worst_slice_gap"] == pytest.approx(overall - 2 / 6)


def test_slice_metrics_with_no_slice_worse_than_overall():
    frame = pd.DataFrame({"Young": [1, 0] * 10})
    s = slice_metrics(frame, np.ones(20), ["Young"], 5)
    assert s["worst_slice"] == "overall"
    assert s["worst_slice_gap"] == 0.0


def test_slice_metrics_ignore_missing_attribute_values():
    # Images without the attribute recorded (empty cells after a reindex) are in no slice.
    frame = pd.DataFrame({"Eyeglasses": [1, 1, 1, 1, 1, "", None, 0, 0, 0, 0, 0]})
    correct = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1], dtype=float)
    s = slice_metrics(frame, correct, ["Eyeglasses"], 5)
    e = s["by_attribute"]["Eyeglasses"]
    assert _na(e["with"]) == {"n": 5, "accuracy": 0.0}
    assert _na(e["without"]) == {"n": 5, "accuracy": 1.0}
    assert s["worst_slice"] == "Eyeglasses:yes"


# --- the operating point on small validation sets ---------------------------------------------


def _scores(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A well-ranking but miscalibrated model (ROC-AUC about 0.99, over-confident and
    shifted towards male), 42% male: the kind of scores the small CNN gives on face crops."""
    y = (rng.random(n) < 0.42).astype(int)
    z = rng.normal(np.where(y == 1, 2.2, -2.2), 1.0)
    return y, 1.0 / (1.0 + np.exp(-(1.8 * z + 0.9)))


def test_the_calibrated_cut_loses_less_test_accuracy_than_max_f1_on_small_val_sets():
    """Over 300 resampled validation sets of 230 images: the test accuracy each rule gives
    up against the best possible cut. Max-F1 chases noise (a few images move the argmax);
    Platt scaling has two parameters and a fixed cut."""
    from genderclf.stages.evaluate import operating_point

    rng = np.random.default_rng(0)
    yt, pt = _scores(rng, 50_000)
    cuts = np.linspace(0.01, 0.99, 197)
    best = max(float(((pt >= c) == yt).mean()) for c in cuts)
    loss: dict[str, list[float]] = {"val_f1": [], "calibrated": []}
    for _ in range(300):
        yv, pv = _scores(rng, 230)
        for mode in loss:
            platt, cut = operating_point(mode, yv, pv)
            loss[mode].append(best - float(((platt.apply(pt) >= cut) == yt).mean()))
    mean = {k: float(np.mean(v)) for k, v in loss.items()}
    p90 = {k: float(np.quantile(v, 0.9)) for k, v in loss.items()}
    print(f"test accuracy lost against the best cut: mean {mean}, 90th percentile {p90}")
    assert mean["calibrated"] < mean["val_f1"] / 2
    assert p90["calibrated"] < p90["val_f1"]


@pytest.mark.parametrize("n", [1, 5, 26, 157, 1000])
def test_wilson_interval_holds_the_proportion_at_zero_and_one(n):
    from genderclf.model.stats import wilson

    for k in (0, n):  # statsmodels' upper bound at 157/157 is 0.9999999999999999
        lo, hi = wilson(k, n)
        assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_slices_plot_draws_a_slice_with_every_answer_right(tmp_path):
    """A perfect slice of 157 images (the demo had one) is drawn, not a matplotlib error."""
    from genderclf.model.plots import write_plots

    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 100)
    p = np.clip(y * 0.8 + rng.uniform(0, 0.2, len(y)), 0, 1)
    correct = ((p >= 0.5).astype(int) == y).astype(float)
    frame = pd.DataFrame({"Young": [1] * 157 + [0] * 43})
    slices = slice_metrics(frame, correct, ["Young"], 30)
    assert slices["by_attribute"]["Young"]["with"]["accuracy"] == 1.0
    m = compute_metrics(y, p, 0.5, 10)
    _, calib = expected_calibration_error(y, p, 10)
    files = write_plots(y, p, m, calib, slices, tmp_path)
    assert (tmp_path / "slices.png").stat().st_size > 0 and tmp_path / "slices.png" in files
