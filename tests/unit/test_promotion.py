"""The promotion gate's checks as plain functions over two models' answers: no registry,
no MLflow, no files (`genderclf.promotion`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from genderclf.promotion import (
    Scores,
    calibration_check,
    decide,
    floor_check,
    gap_text,
    paired_check,
    serving_check,
    slices_check,
)

NAMES = [f"{i}.jpg" for i in range(100)]
Y = np.array([i % 2 for i in range(100)])


def _scores(right: int) -> Scores:
    """Answers right on the first `right` images, wrong on the rest (cut 0.5)."""
    correct = np.arange(100) < right
    p = np.where(correct == (Y == 1), 0.9, 0.1)
    return Scores(NAMES, Y, p, 0.5)


@pytest.fixture
def cfg(model_settings):
    return model_settings(
        {"register.min_accuracy": 0.6, "register.alpha": 0.05, "register.max_slice_drop": 0.05}
    ).registry


def test_the_floor_is_judged_once_and_the_comparison_apart(cfg):
    below = decide(0.55, 0.5, cfg.min_accuracy, cfg.min_improvement)
    assert not below.meets_floor and below.beats and not below.promote
    check = floor_check(_scores(55), below, cfg)
    assert not check.passed and "is below register.min_accuracy 0.6000" in check.summary
    # the paired check says only how the two compare: the floor is not its business
    paired = paired_check(_scores(55), _scores(50), "3", below, cfg, 200, 0)
    assert "beats the champion's 0.5000" in paired.summary and "floor" not in paired.summary


def test_a_significant_improvement_passes_the_paired_check(cfg):
    cand, champ = _scores(90), _scores(60)
    verdict = decide(cand.accuracy, champ.accuracy, cfg.min_accuracy, cfg.min_improvement)
    check = paired_check(cand, champ, "3", verdict, cfg, 200, 0)
    assert check.passed and check.numbers["only_a"] == 30 and check.numbers["only_b"] == 0
    assert "McNemar exact p=" in check.summary and "against version 3" in check.summary
    few = _scores(62)
    verdict = decide(few.accuracy, champ.accuracy, cfg.min_accuracy, cfg.min_improvement)
    assert not paired_check(few, champ, "3", verdict, cfg, 200, 0).passed  # 2 images: noise


def test_a_slice_that_drops_fails_under_its_one_name(cfg):
    test = pd.DataFrame({"Eyeglasses": [1] * 20 + [0] * 80}, index=NAMES)
    champ = _scores(100)
    cand = _scores(100)
    cand.p[:5] = 1 - cand.p[:5]  # 5 of the 20 with glasses now wrong
    check = slices_check(cand, champ, test, ["Eyeglasses"], 10, cfg)
    assert not check.passed and check.numbers["worst"]["slice"] == "Eyeglasses:yes"
    assert check.numbers["worst"]["drop"] == pytest.approx(0.25)


def test_calibration_and_serving_checks(cfg):
    assert calibration_check(cfg.max_ece, cfg).passed
    assert not calibration_check(cfg.max_ece + 0.01, cfg).passed
    want = np.array([0.2, 0.7])
    same = serving_check("4", want, want.copy(), cfg)
    assert same.passed and "within < 1e-6 of the evaluated model" in same.summary
    off = serving_check("4", want, want + 0.1, cfg)
    assert not off.passed and "within 0.1 of" in off.summary
    broken = serving_check("4", want, "exit 1: no module named keras", cfg)
    assert not broken.passed and "did not load and answer" in broken.summary


@pytest.mark.parametrize(
    ("gap", "text"), [(0.0, "< 1e-6"), (3e-7, "< 1e-6"), (0.0023, "0.0023"), (np.inf, "inf")]
)
def test_a_gap_reads_as_a_number(gap, text):
    assert gap_text(gap).startswith(text)
