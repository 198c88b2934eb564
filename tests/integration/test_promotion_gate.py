"""The promotion gate against a real MLflow registry (SQLite store in tmp_path).

Models are real Keras models: untrained small CNNs (about chance on the test split) and
one trained for a few epochs on the tiny prepared sample (clearly better). The candidate's
per-image answers are what the evaluate stage records (predictions.csv); the champion is
scored by the stage itself on the same test images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.helpers.stages import log_model_run, write_evaluation
from tests.helpers.stages import register as run_register

from genderclf.config import Paths, Settings
from genderclf.tracking.setup import CHAMPION, MODEL_NAME

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_settings, prepared_augmented, prepared):
    """A small CNN trained for a few epochs: clearly better than an untrained one."""
    import keras

    from genderclf.data.tfrecords import make_dataset
    from genderclf.model.backbones import build_model
    from genderclf.model.scoring import predict_split

    settings = model_settings()
    keras.utils.set_random_seed(5)
    model = build_model(settings.train, settings.base.image_size)
    model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy", metrics=["accuracy"])
    best, best_acc = None, 0.0
    for _ in range(8):  # keep the best epoch on the validation split (runs vary: 0.68-0.85)
        model.fit(make_dataset(prepared_augmented, "train", 8, shuffle=True), verbose=0)
        _, yv, pv = predict_split(model, prepared, "val", 64)
        if (acc := float(((pv >= 0.5) == yv).mean())) > best_acc:
            best, best_acc = model.get_weights(), acc
    model.set_weights(best)
    _, y, pred, _ = _answers(model, prepared)
    assert float((pred == y).mean()) > 0.65  # an untrained one: about 0.5
    return model


def _untrained(settings: Settings, seed: int):
    import keras

    from genderclf.model.backbones import build_model

    keras.utils.set_random_seed(seed)
    return build_model(settings.train, settings.base.image_size)


def _answers(model, prepared: Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(paths, labels, answers at 0.5, P(male)) on the test split, as evaluate scores it."""
    from genderclf.model.scoring import predict_split

    names, y, p = predict_split(model, prepared, "test", 64)
    return names, y, (p >= 0.5).astype(int), p


class Workspace:
    """Candidates registered one after the other, as `dvc repro` of register would."""

    def __init__(self, settings: Settings, prepared: Path, splits: Path):
        self.settings, self.prepared, self.splits, self.n = settings, prepared, splits, 0

    def candidate(
        self,
        model,
        pred: np.ndarray | None = None,
        names=None,
        y=None,
        prob: np.ndarray | None = None,
    ) -> Path:
        """A run holding `model`, and the evaluate stage's record: `pred` (with `prob`), or
        the model's own answers."""
        self.n += 1
        folder = Path(f"candidate{self.n}")
        log_model_run(model, self.settings, folder)
        if pred is None:
            names, y, pred, prob = _answers(model, self.prepared)
        write_evaluation(folder, names, y, pred=pred, prob=prob)
        return folder

    def register(self, folder: Path, settings: Settings | None = None) -> dict[str, Any]:
        return run_register(
            settings or self.settings,
            folder / "run.json",
            folder / "eval.json",
            self.prepared,
            folder / "register.json",
            self.splits,
        )

    def paths(self) -> Paths:
        return Paths(prepared=self.prepared, splits=self.splits)


@pytest.fixture
def gate_settings(model_settings) -> Settings:
    # The gate as params.yaml has it (alpha 0.05, slices, serving), with a floor any model
    # clears and slices small enough for the tiny test split. A few CPU epochs of the small
    # CNN give an ECE of 0.08-0.13 depending on the machine, so the calibration check has
    # its own test with answers whose ECE is known.
    return model_settings(
        {
            "register.min_accuracy": 0.05,
            "evaluate.min_slice_n": 10,
            "register.serving_check_images": 8,
            "register.max_ece": 1.0,
        }
    )


@pytest.fixture
def ws(mlflow_store, gate_settings, prepared, sample_data) -> Workspace:
    return Workspace(gate_settings, prepared, sample_data[1])


def _check(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in report["checks"] if c["name"] == name)


def _champion() -> str | None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return str(MlflowClient().get_model_version_by_alias(MODEL_NAME, CHAMPION).version)
    except MlflowException:
        return None


def _with(settings: Settings, **register: Any) -> Settings:
    return settings.model_copy(update={"register_": settings.registry.model_copy(update=register)})


def test_a_significant_improvement_promotes_and_every_check_is_recorded(ws, trained):
    first = ws.register(ws.candidate(_untrained(ws.settings, 1)))
    assert first["decision"] == "promoted"
    # An untrained champion answers one class for nearly everyone, so it "wins" the slices
    # of that class; the slice check has its own test below.
    r = ws.register(ws.candidate(trained), _with(ws.settings, max_slice_drop=1.0))
    assert r["decision"] == "promoted" and _champion() == "2", r["reasons"]
    assert [c["name"] for c in r["checks"]] == [
        "floor",
        "paired",
        "slices",
        "calibration",
        "serving",
    ]
    paired = _check(r, "paired")
    assert paired["passed"] and paired["numbers"]["p_value"] < 0.05
    assert paired["numbers"]["only_a"] > paired["numbers"]["only_b"]
    lo, hi = paired["numbers"]["interval"]
    assert 0 < lo < paired["numbers"]["difference"] < hi
    from genderclf.model.scoring import expected_calibration_error

    _, y, _, prob = _answers(trained, ws.prepared)
    ece = _check(r, "calibration")["numbers"]["ece"]  # the evaluate stage's figure
    assert ece == pytest.approx(expected_calibration_error(y, prob, 10)[0])
    serving = _check(r, "serving")
    assert serving["passed"] and serving["numbers"]["images"] == 8
    assert serving["numbers"]["max_abs_difference"] <= ws.settings.registry.serving_tolerance
    # the decision, each check and the card go with the version
    from mlflow import MlflowClient

    mv = MlflowClient().get_model_version(MODEL_NAME, "2")
    assert mv.description.startswith("Promoted to champion.\n")  # plain text: the list shows it
    assert "- pass paired: against version 1" in mv.description
    assert "## Intended use" in mv.description and "not** anyone's gender" in mv.description
    card = Path("candidate2/model_card.md").read_text()
    assert "| paired | pass |" in card and "## Known limits" in card


def test_an_insignificant_improvement_does_not_promote(ws, trained):
    champion = ws.candidate(trained)
    assert ws.register(champion)["decision"] == "promoted"
    names, y, pred, _ = _answers(trained, ws.prepared)
    better = pred.copy()
    wrong = np.flatnonzero(pred != y)[:2]
    better[wrong] = y[wrong]  # two more right, nothing else different: no evidence
    r = ws.register(
        ws.candidate(trained, better, names, y), _with(ws.settings, serving_check_images=0)
    )
    paired = _check(r, "paired")
    assert r["decision"] == "rejected" and not paired["passed"] and _champion() == "1"
    assert (paired["numbers"]["only_a"], paired["numbers"]["only_b"]) == (2, 0)
    assert "McNemar exact p=0.5" in paired["summary"] and "register.alpha=0.05" in paired["summary"]
    assert r["reasons"][0] == paired["summary"]


def test_a_slice_that_regresses_blocks_promotion(ws, trained, sample_data):
    import pandas as pd

    from genderclf.data.split import read_split

    champion = ws.candidate(trained)
    assert ws.register(champion)["decision"] == "promoted"
    names, y, pred, _ = _answers(trained, ws.prepared)
    frame = read_split(sample_data[1], "test").set_index("path").reindex(names)
    # the smallest slice the gate compares, and the champion's right answers in it
    sizes = {
        (a, v): int((pd.to_numeric(frame[a]) == v).sum())
        for a in ws.settings.evaluate.slices
        for v in (0, 1)
    }
    (attr, value), n = min(
        ((k, v) for k, v in sizes.items() if v >= ws.settings.evaluate.min_slice_n),
        key=lambda kv: kv[1],
    )
    inside = (pd.to_numeric(frame[attr]) == value).to_numpy()
    lose = np.flatnonzero(inside & (pred == y))[: int(np.ceil(0.06 * n))]
    gain = np.flatnonzero(~inside & (pred != y))
    assert len(gain) > len(lose)  # better overall, worse by > max_slice_drop on one slice
    cand = pred.copy()
    cand[lose], cand[gain] = 1 - y[lose], y[gain]
    r = ws.register(
        ws.candidate(trained, cand, names, y),
        _with(ws.settings, alpha=None, serving_check_images=0),
    )
    slices = _check(r, "slices")
    assert _check(r, "paired")["passed"] and not slices["passed"]
    assert r["decision"] == "rejected" and _champion() == "1"
    worst = slices["numbers"]["worst"]
    # one spelling of a slice everywhere (eval.json, plots, card, gate, MLflow)
    assert worst["slice"] == f"{attr}:{'yes' if value == 1 else 'no'}" and worst["n"] == n
    assert worst["drop"] == pytest.approx(len(lose) / n)
    assert "register.max_slice_drop=0.05" in slices["summary"]


def test_an_overconfident_candidate_is_not_promoted(ws, trained):
    """Right as often as the champion and then some, but 99% sure of every answer: its
    expected calibration error is about its error rate, over register.max_ece."""
    champion = ws.candidate(_untrained(ws.settings, 1))
    assert ws.register(champion)["decision"] == "promoted"
    names, y, pred, _ = _answers(trained, ws.prepared)
    sure = np.where(pred == 1, 0.99, 0.01)
    strict = _with(ws.settings, max_ece=0.05, max_slice_drop=1.0, serving_check_images=0)
    r = ws.register(ws.candidate(trained, pred, names, y, prob=sure), strict)
    calibration = _check(r, "calibration")
    assert _check(r, "paired")["passed"] and not calibration["passed"]
    assert calibration["numbers"]["ece"] == pytest.approx(abs(0.99 - (pred == y).mean()), abs=0.01)
    assert "register.max_ece=0.05" in calibration["summary"]
    assert r["decision"] == "rejected" and _champion() == "1"


@pytest.mark.parametrize("fault", ["answers differently", "does not load"])
def test_a_served_model_that_fails_the_serving_check_is_not_promoted(
    ws, trained, monkeypatch, fault
):
    """The registered pyfunc is broken on purpose while it is packaged: it holds another
    model's weights, or a serving.json it cannot read."""
    from genderclf.tracking import serving

    real = serving.log_serving_model
    other = _untrained(ws.settings, 9)

    def broken(keras_file: Path, config, example):
        if fault == "answers differently":
            from genderclf.model.saving import save_model

            keras_file = save_model(other, keras_file.with_name("other.keras"))
            return real(keras_file, config, example)
        from dataclasses import replace

        return real(keras_file, replace(config, image_size=-1, calibration=("x", "y")), example)

    monkeypatch.setattr(serving, "log_serving_model", broken)
    r = ws.register(ws.candidate(trained))
    check = _check(r, "serving")
    assert not check["passed"] and r["decision"] == "rejected" and _champion() is None
    if fault == "answers differently":
        assert check["numbers"]["max_abs_difference"] > ws.settings.registry.serving_tolerance
    else:
        assert "did not load and answer" in check["summary"]


def test_promote_force_and_rollback(ws, trained):
    from mlflow import MlflowClient

    from genderclf import services
    from genderclf.tracking.registry import MlflowRegistry

    ws.register(ws.candidate(_untrained(ws.settings, 1)))  # v1 champion
    lenient = _with(ws.settings, approval="manual", max_slice_drop=1.0)
    r = ws.register(ws.candidate(trained), lenient)  # v2: passes, waits for a person
    assert r["decision"] == "pending_approval" and _champion() == "1"
    registry = MlflowRegistry(0)
    # the untrained champion answers one class, so a slice of that class can only drop:
    # this test is about approval and the alias history, not the slice check
    out = services.promote(
        lenient, ws.paths(), "2", "reviewed the card", by="ana", registry=registry
    )
    assert out.moved and _champion() == "2", [c for c in out.checks if not c.passed]
    move = json.loads(MlflowClient().get_model_version(MODEL_NAME, "2").tags["alias.champion.set"])
    assert (move["from"], move["to"]) == ("1", "2") and "by ana: reviewed the card" in move[
        "reason"
    ]

    # back to the version it replaced, from the recorded history
    assert registry.previous_champion() == ("2", "1")
    assert registry.promote("1", "2", "rollback: v2 misbehaves in production")
    assert _champion() == "1"
    rolled = json.loads(
        MlflowClient().get_model_version(MODEL_NAME, "1").tags["alias.champion.set"]
    )
    assert rolled["reason"].startswith("rollback:") and rolled["from"] == "2"

    # a worse version does not pass the gate against v1... unless forced, and then it says so
    ws.register(ws.candidate(_untrained(ws.settings, 7)), lenient)
    out = services.promote(ws.settings, ws.paths(), "3", "try it", registry=registry)
    if not out.moved:
        assert _champion() == "1"
        out = services.promote(
            ws.settings, ws.paths(), "3", "try it", force=True, registry=registry
        )
        assert out.moved and "forced (gate failed)" in out.move["reason"]
    assert _champion() == "3"


def test_the_cli_promote_and_rollback(ws, trained, tmp_path):
    """`genderclf promote` and `genderclf rollback` in a workspace, through typer."""
    import yaml
    from typer.testing import CliRunner

    from genderclf.cli import app

    ws.register(ws.candidate(_untrained(ws.settings, 1)))
    manual = _with(ws.settings, approval="manual", max_slice_drop=1.0)
    ws.register(ws.candidate(trained), manual)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(manual.model_dump(by_alias=True)))  # slices: as above
    Path("data").mkdir()
    Path("data/prepared").symlink_to(ws.prepared, target_is_directory=True)
    Path("data/splits").symlink_to(ws.splits, target_is_directory=True)
    out = CliRunner().invoke(app, ["promote", "2", "--reason", "approved", "-p", str(params)])
    assert out.exit_code == 0, out.output
    assert "pass paired" in out.output and "promote: champion 1 -> 2" in out.output
    out = CliRunner().invoke(app, ["promote", "2", "--reason", "again", "-p", str(params)])
    assert out.exit_code == 1 and "already the champion" in out.output
    out = CliRunner().invoke(app, ["rollback", "--reason", "bad", "-p", str(params)])
    assert out.exit_code == 0 and "rollback: champion 2 -> 1" in out.output
    assert _champion() == "1"
