"""The drift tests on known cases, the reference file, the report text (no model here)."""

from __future__ import annotations

import numpy as np
import pytest

from genderclf.monitor.profile import FEATURES, Profile, ReferenceError
from genderclf.monitor.stats import ks_per_feature, mmd_test, two_proportions

ALPHA = 0.05


def _gauss(rng, n, d=16, shift=0.0, scale=1.0):
    return rng.normal(shift, scale, (n, d))


def test_mmd_false_alarm_rate_is_at_most_alpha_on_one_distribution():
    # 200 independent pairs from one distribution: alarms are Binomial(200, <= 0.05); the
    # tolerance is 2.5 standard deviations of that count (0.05 + 0.039).
    trials, alarms = 200, 0
    for seed in range(trials):
        rng = np.random.default_rng(10_000 + seed)
        alarms += mmd_test(_gauss(rng, 40), _gauss(rng, 40), 99, ALPHA, seed).drifted
    rate = alarms / trials
    assert rate <= ALPHA + 2.5 * np.sqrt(ALPHA * (1 - ALPHA) / trials), rate


@pytest.mark.parametrize(("shift", "scale"), [(0.5, 1.0), (0.0, 1.6)])
def test_mmd_alarms_on_a_clear_shift_of_mean_or_spread(shift, scale):
    for seed in range(5):
        rng = np.random.default_rng(seed)
        r = mmd_test(_gauss(rng, 60), _gauss(rng, 60, shift=shift, scale=scale), 199, ALPHA, seed)
        assert r.drifted and r.p_value <= 0.01 and r.statistic > np.quantile(r.null, 0.99)


def test_mmd_is_seeded_and_checks_its_input():
    rng = np.random.default_rng(0)
    x, y = _gauss(rng, 30), _gauss(rng, 30)
    a, b = mmd_test(x, y, 50, ALPHA, 7), mmd_test(x, y, 50, ALPHA, 7)
    assert a.p_value == b.p_value and np.array_equal(a.null, b.null)
    assert a.bandwidth > 0 and len(a.null) == 50
    with pytest.raises(ValueError, match="two samples"):
        mmd_test(x[:1], y, 50, ALPHA, 0)
    with pytest.raises(ValueError, match="one dimension"):
        mmd_test(x, y[:, :3], 50, ALPHA, 0)


def test_ks_per_feature_bonferroni_and_constant_columns():
    rng = np.random.default_rng(1)
    ref = np.column_stack([np.full(100, 178.0), rng.normal(0.5, 0.1, 100), rng.uniform(size=100)])
    same = np.column_stack([np.full(80, 178.0), rng.normal(0.5, 0.1, 80), rng.uniform(size=80)])
    dark = same.copy()
    dark[:, 1] *= 0.5
    names = ["width", "brightness", "blue"]
    assert not any(t.drifted for t in ks_per_feature(ref, same, names, ALPHA))
    tests = {t.name: t for t in ks_per_feature(ref, dark, names, ALPHA)}
    assert tests["brightness"].drifted and tests["brightness"].p_value < ALPHA / 3
    assert tests["width"].statistic == 0.0 and tests["width"].p_value == 1.0
    assert not tests["width"].drifted and not tests["blue"].drifted
    other_size = same.copy()
    other_size[:, 0] = 640.0
    assert {t.name for t in ks_per_feature(ref, other_size, names, ALPHA) if t.drifted} == {"width"}


def test_two_proportions():
    delta, p = two_proportions(50, 100, 50, 100)
    assert delta == 0 and p == pytest.approx(1.0)
    delta, p = two_proportions(50, 100, 80, 100)
    assert delta == pytest.approx(0.3) and p < 1e-4
    assert two_proportions(0, 10, 0, 10) == (0.0, 1.0)


def _profile(rng, n=12, d=8) -> Profile:
    p = rng.uniform(size=n)
    return Profile(
        [f"img_{i}.jpg" for i in range(n)],
        rng.uniform(size=(n, len(FEATURES))),
        rng.normal(size=(n, d)).astype(np.float32),
        p,
        (p >= 0.5).astype(int),
        [("bad.jpg", "truncated: corrupt or truncated image")],
        {"source": "test"},
    )


def test_reference_round_trip(tmp_path):
    prof = _profile(np.random.default_rng(3))
    path = prof.save(tmp_path / "reports" / "reference.npz")
    back = Profile.load(path)
    assert back.names == prof.names and back.failed == prof.failed
    assert back.meta["source"] == "test" and back.meta["features"] == FEATURES
    np.testing.assert_allclose(back.features, prof.features, rtol=1e-6)
    np.testing.assert_allclose(back.embeddings, prof.embeddings, atol=2e-3)  # float16 on disk
    np.testing.assert_allclose(back.p_male, prof.p_male, rtol=1e-6)
    np.testing.assert_array_equal(back.male, prof.male)
    np.testing.assert_allclose(back.confidence, np.maximum(prof.p_male, 1 - prof.p_male), 1e-6)
    assert path.stat().st_size < 10_000
    assert [p.name for p in path.parent.iterdir()] == ["reference.npz"]  # no temp left


def test_reference_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(ReferenceError, match=r"missing\.npz: no reference.*dvc repro evaluate"):
        Profile.load(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_text("not numpy")
    with pytest.raises(ReferenceError, match=r"bad\.npz: not readable"):
        Profile.load(bad)


def _population(rng, n, male_rate=0.5, brightness=0.5, d=8) -> Profile:
    male = (rng.uniform(size=n) < male_rate).astype(int)
    p = np.where(male == 1, rng.uniform(0.7, 0.99, n), rng.uniform(0.01, 0.3, n))
    feats = np.column_stack(
        [
            np.full(n, 178.0),
            np.full(n, 218.0),
            rng.normal(brightness, 0.08, n),
            *(rng.uniform(size=n) for _ in FEATURES[3:]),
        ]
    )
    emb = rng.normal(size=(n, d)) + male[:, None]  # embeddings follow the class mix
    return Profile([f"{i}.jpg" for i in range(n)], feats, emb.astype(np.float32), p, male)


def test_compare_each_view_on_known_cases(make_settings, tmp_path):
    from genderclf.monitor.drift import compare, markdown, summarize
    from genderclf.monitor.plots import drift_figure

    cfg = make_settings({"drift.permutations": 200}).drift
    rng = np.random.default_rng(5)
    ref = _population(rng, 300)
    same = compare(ref, _population(rng, 200), cfg, 0)
    assert not same["drifted"]
    mostly_men = compare(ref, _population(rng, 200, male_rate=0.85), cfg, 0)
    v = mostly_men["views"]
    assert mostly_men["drifted"] and v["predictions"]["male_fraction_drifted"]
    assert v["predictions"]["male_fraction_delta"] == pytest.approx(0.35, abs=0.08)
    assert not v["image"]["drifted"] and v["embeddings"]["drifted"]
    dark = compare(ref, _population(rng, 200, brightness=0.3), cfg, 0)
    feats = dark["views"]["image"]["features"]
    top = max(feats, key=lambda f: f["statistic"])
    assert top["name"] == "brightness" and top["drifted"] and top["p_value"] < 1e-20
    assert not any(f["drifted"] for f in feats if f["name"] in ("width", "height"))
    assert not dark["views"]["predictions"]["drifted"]
    # the words and the picture
    batch = _population(rng, 200, brightness=0.3)
    result = {
        **dark,
        "batch": {
            "images": 200,
            "failed": [{"file": "x.jpg", "reason": "truncated"}],
            "location": "s3://b/new",
        },
        "reference": {"images": 300},
    }
    result["summary"] = summarize(result, "s3://b/new", "version 4")
    assert result["summary"].startswith("DRIFT in 1 of 3 views: 200 images of s3://b/new")
    assert "brightness median 0.5" in result["summary"] and "1 files could not" in result["summary"]
    assert "`x.jpg`: truncated" in markdown(result)
    out = drift_figure(ref, batch, result, result.pop("null"), 20, tmp_path / "drift.png")
    assert out.stat().st_size > 20_000
    with pytest.raises(ReferenceError, match="not this model's"):
        compare(ref, _population(rng, 50, d=4), cfg, 0)


def test_the_summary_names_every_drifted_feature(make_settings):
    """Five statistics moved (a darker, greyer, smaller camera): the paragraph names all
    five, as drift.json marks them (it used to stop at four)."""
    from genderclf.monitor.drift import compare, summarize

    cfg = make_settings({"drift.permutations": 200}).drift
    rng = np.random.default_rng(3)
    ref = _population(rng, 300)
    batch = _population(rng, 200, brightness=0.3)
    batch.features[:, 0] = 120.0  # width
    batch.features[:, 1] = 150.0  # height
    batch.features[:, 3:] = rng.uniform(0.5, 1.5, (200, len(FEATURES) - 3))
    result = compare(ref, batch, cfg, 0)
    marked = [f["name"] for f in result["views"]["image"]["features"] if f["drifted"]]
    assert len(marked) >= 5
    result |= {
        "batch": {"images": 200, "failed": [], "location": "x/"},
        "reference": {"images": 300},
    }
    summary = summarize(result, "x/", "version 1")
    assert all(f"{name} median" in summary for name in marked), (marked, summary)


def test_drift_settings_are_checked(make_settings):
    from genderclf.config import SettingsError

    with pytest.raises(SettingsError, match=r"never give a p-value below drift\.alpha"):
        make_settings({"drift.permutations": 30, "drift.alpha": 0.01})
    with pytest.raises(SettingsError, match=r"drift\.max_images=10 is below drift\.min_images"):
        make_settings({"drift.max_images": 10, "drift.min_images": 30})


def test_confidence_view_needs_a_real_fall_not_a_small_reference(make_settings):
    from genderclf.monitor.drift import compare
    from genderclf.monitor.stats import mean_drop

    cfg = make_settings({"drift.permutations": 200}).drift
    rng = np.random.default_rng(8)
    big = _population(rng, 300)
    unsure = _population(rng, 200)
    unsure.p_male = np.where(
        unsure.male == 1, rng.uniform(0.5, 0.75, 200), rng.uniform(0.25, 0.5, 200)
    )
    v = compare(big, unsure, cfg, 0)["views"]["predictions"]
    assert v["confidence_drifted"] and v["confidence_drop"] > 0.2 and v["confidence_p_value"] < 1e-6
    # a dozen reference images, a mean 0.15 above the batch by chance: no alarm
    tiny = _population(np.random.default_rng(0), 12)
    tiny.male[:] = 1
    tiny.p_male = np.array([0.99] * 6 + [0.5] * 6)  # confidence mean 0.745, sd 0.26
    noisy = _population(rng, 200)
    noisy.male[:] = 1
    noisy.p_male = np.linspace(0.5, 0.76, 200)  # mean 0.63
    drop, p = mean_drop(tiny.confidence, noisy.confidence)
    assert drop > cfg.max_confidence_drop and p > cfg.alpha
    with pytest.raises(ReferenceError, match=r"reference holds 12 images, fewer than drift\.min"):
        compare(tiny, noisy, cfg, 0)  # and so few reference images are refused anyway
    assert mean_drop(np.ones(5), np.ones(5)) == (0.0, 1.0)
