"""The search's pure parts: the space in params.yaml, the study (on Optuna's real journal
storage, with the values a trial would report), the tuned params file, `--apply`, and the
stage with tuning off (seconds, no TensorFlow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tests.helpers import BIN, REPO_ROOT
from tests.helpers.params import real_params, shrink

from genderclf.config import Paths, SettingsError, parse_settings
from genderclf.model.tune import (
    StudyHost,
    distributions,
    objective_so_far,
    starting_point,
    trial_settings,
)
from genderclf.model.tuned import TunedParams, TunedParamsError, effective_settings

SPACE = {
    "lr_head": {"low": 0.0001, "high": 0.01, "log": True},
    "optimizer": {"choices": ["adam", "sgd"]},
    "epochs_head": {"low": 1, "high": 4, "log": False},
}


def _settings(overrides=None, space=None):
    raw = shrink(real_params(), {"tune.enabled": True, **(overrides or {})})
    if space is not None:
        raw["tune"]["space"] = space
    return parse_settings(raw)


def _error(space) -> str:
    with pytest.raises(SettingsError) as err:
        _settings(space=space)
    return str(err.value)


# --- the space in params.yaml ------------------------------------------------------------------


def test_the_committed_space_is_valid_and_over_train_keys():
    s = _settings()
    assert s.tune.space and s.tune.enabled
    assert set(distributions(s.tune)) == set(s.tune.space)
    assert set(s.tune.space) <= set(s.train.model_dump())


@pytest.mark.parametrize(
    ("space", "message"),
    [
        (
            {"image_size": {"low": 32, "high": 64, "log": False}},
            "tune.space.image_size: not a train",
        ),
        ({"copies": {"choices": [0, 1]}}, "tune.space.copies: not a train.* key"),
        ({"train.lr_head": {"choices": [0.1]}}, "tune.space.train.lr_head: not a train.* key"),
        ({"deterministic": {"choices": ["on", "off"]}}, "changes speed, not what the model"),
        (
            {"lr_head": {"low": 0.01, "high": 0.001, "log": True}},
            "tune.space.lr_head.high: must be above tune.space.lr_head.low (0.01) (got 0.001)",
        ),
        (
            {"lr_head": {"low": 0.001, "high": 2.0, "log": True}},
            "tune.space.lr_head.high: 2.0 is not a valid train.lr_head",
        ),
        (
            {"dropout": {"low": 0.0, "high": 0.5, "log": True}},
            "tune.space.dropout.low: tune.space.dropout.log is true, which needs low > 0",
        ),
        (
            {"epochs_head": {"low": 1.5, "high": 3, "log": False}},
            "train.epochs_head is an integer, so tune.space.epochs_head.low and",
        ),
        (
            {"optimizer": {"low": 0, "high": 1, "log": False}},
            "train.optimizer is not a number: give {choices: [...]} instead",
        ),
        ({"batch_size": {"choices": [16, 0]}}, "tune.space.batch_size.choices: 0 is not a valid"),
        ({"backbone": {"choices": ["vgg16", "alexnet"]}}, "'alexnet' is not a valid train.backb"),
        ({"dropout": {"low": 0.1}}, "tune.space.dropout.high: missing"),
        (
            {"dropout": {"choices": []}},
            "tune.space.dropout.choices: List should have at least 1 item",
        ),
        ({}, "tune.space: Dictionary should have at least 1 item"),
    ],
)
def test_a_bad_space_names_the_key(space, message):
    msg = _error(space)
    assert message in msg, msg
    assert len(msg.splitlines()) <= 3, msg  # one line per problem, not a dump of the input


def test_distributions_follow_the_train_key_types():
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    d = distributions(_settings(space=SPACE).tune)
    assert d["lr_head"] == FloatDistribution(0.0001, 0.01, log=True)
    assert d["epochs_head"] == IntDistribution(1, 4)
    assert d["optimizer"] == CategoricalDistribution(["adam", "sgd"])


def test_the_starting_point_is_params_yaml_inside_the_space():
    s = _settings({"train.lr_head": 0.001, "train.epochs_head": 9}, space=SPACE)
    # epochs_head=9 lies outside 1..4: the search samples it instead
    assert starting_point(s) == {"lr_head": 0.001, "optimizer": "adam"}


def test_trial_settings_are_validated_like_params():
    s = _settings(space=SPACE)
    assert trial_settings(s, {"lr_head": 0.005}).train.lr_head == 0.005
    assert trial_settings(s, {"lr_head": 0.005}).train.batch_size == s.train.batch_size
    with pytest.raises(ValueError):
        trial_settings(s, {"lr_head": -1.0})


def test_the_objective_is_the_kept_epoch():
    rows = [
        {"epoch": 1, "val_loss": 0.7, "val_accuracy": 0.6},
        {"epoch": 2, "val_loss": 0.5, "val_accuracy": 0.7},
        {"epoch": 3, "val_loss": float("nan"), "val_accuracy": 0.9},
        {"epoch": 4, "val_loss": 0.55, "val_accuracy": 0.8},
    ]
    # the train stage keeps the epoch with the lowest (finite) validation loss: epoch 2
    assert objective_so_far(rows, "val_accuracy") == 0.7
    assert objective_so_far(rows, "val_loss") == 0.5
    assert objective_so_far(rows[2:3], "val_accuracy") is None
    assert objective_so_far([], "val_loss") is None


# --- the study on its journal ------------------------------------------------------------------


def _run(host: StudyHost, curve: list[float], end: str = "complete") -> tuple[int, str]:
    """A trial that reports `curve` (one value per epoch) the way run_trial does."""
    number, _ = host.ask()
    for step, value in enumerate(curve, start=1):
        if host.report(number, step, value):
            host.tell(number, "pruned", None)
            return number, "pruned"
    host.tell(number, end, curve[-1] if end == "complete" else None)
    return number, end


def test_the_median_pruner_stops_a_trial_below_the_median(tmp_path):
    s = _settings({"tune.pruner": "median", "tune.startup_trials": 2, "tune.warmup_epochs": 1})
    host = StudyHost(str(tmp_path / "journal.log"), "s", s)
    assert _run(host, [0.70, 0.80, 0.85]) == (0, "complete")
    assert _run(host, [0.72, 0.82, 0.86]) == (1, "complete")
    # below both at epoch 2 (epoch 1 is the warm-up): stopped there
    assert _run(host, [0.50, 0.55, 0.90]) == (2, "pruned")
    assert _run(host, [0.75, 0.83, 0.9]) == (3, "complete")
    assert host.counts() == {"complete": 3, "pruned": 1, "failed": 0}
    assert host.finished() == 4
    trials = host.trials()
    assert [t["state"] for t in trials] == ["complete", "complete", "pruned", "complete"]
    assert trials[2]["curve"] == {1: 0.5, 2: 0.55}
    assert host.best()["number"] == 3


def test_successive_halving_prunes_the_worse_half(tmp_path):
    s = _settings(
        {"tune.pruner": "successive_halving", "tune.warmup_epochs": 1, "tune.reduction_factor": 2}
    )
    host = StudyHost(str(tmp_path / "journal.log"), "s", s)
    _run(host, [0.8, 0.85])
    _run(host, [0.9, 0.92])
    # the first rung is epoch 2 (epoch 1 is the warm-up): the best half goes on
    assert _run(host, [0.95, 0.6, 0.99])[1] == "pruned"
    assert _run(host, [0.5, 0.93, 0.99])[1] == "complete"


def test_a_val_loss_search_minimises(tmp_path):
    s = _settings({"tune.metric": "val_loss", "tune.pruner": "none"})
    host = StudyHost(str(tmp_path / "journal.log"), "s", s)
    for curve in ([0.6], [0.4], [0.5]):
        _run(host, curve)
    assert host.best()["number"] == 1


def test_the_first_trial_is_params_yaml_and_the_sampler_is_seeded(tmp_path):
    s = _settings(space=SPACE)
    asked = []
    for name in ("a", "b"):
        host = StudyHost(str(tmp_path / f"{name}.log"), name, s)
        params = []
        for _ in range(4):
            n, p = host.ask()
            params.append(p)
            host.tell(n, "complete", 0.5 + 0.01 * n)
        asked.append(params)
    assert asked[0][0] == {**starting_point(s), "epochs_head": asked[0][0]["epochs_head"]}
    assert asked[0][0]["lr_head"] == s.train.lr_head
    assert asked[0] == asked[1]  # the same seed, the same trials in the same order
    assert len({json.dumps(p, sort_keys=True) for p in asked[0]}) == 4


def test_a_killed_search_continues_its_journal(tmp_path):
    """A trial left running (the process died) is recorded as failed and queued again;
    the finished ones stay finished and count toward the budget."""
    s = _settings(space=SPACE)
    journal = str(tmp_path / "journal.log")
    host = StudyHost(journal, "s", s)
    _run(host, [0.6])
    lost, lost_params = host.ask()  # then the process is killed
    del host

    again = StudyHost(journal, "s", s)
    assert again.resumed and again.abandoned == [lost]
    assert again.counts() == {"complete": 1, "pruned": 0, "failed": 1}
    assert again.finished() == 1
    number, params = again.ask()
    assert number == lost + 1 and params == lost_params  # the lost trial runs again
    again.tell(number, "complete", 0.7)
    assert [t["repeats"] for t in again.trials()] == [None, None, lost]
    assert StudyHost(journal, "s", s).abandoned == []  # nothing left running now


def test_importances_come_from_complete_trials(tmp_path):
    s = _settings(space=SPACE)
    host = StudyHost(str(tmp_path / "journal.log"), "s", s)
    assert host.importances() == {}
    for _ in range(8):
        n, p = host.ask()
        host.tell(n, "complete", p["lr_head"] * 10)  # only the learning rate matters
    imp = host.importances()
    assert set(imp) == set(SPACE) and max(imp, key=imp.get) == "lr_head"
    assert imp == StudyHost(str(tmp_path / "journal.log"), "s", s).importances()  # seeded


def test_the_time_guard_and_failures_stop_the_search_with_what_to_do():
    import time as clock

    from genderclf.model.tune import TuneError
    from genderclf.stages.tune import _guard

    s = _settings({"tune.trials": 4})
    ok = {"complete": 1, "pruned": 1, "failed": 4}
    _guard(s, clock.time() + 60, ok)  # within the guard, failures not above the budget
    with pytest.raises(TuneError, match=r"timeout_minutes=.* reached after 2 of 4 trials"):
        _guard(s, clock.time() - 1, ok)
    with pytest.raises(TuneError, match="5 trials failed"):
        _guard(s, clock.time() + 60, {**ok, "failed": 5})


# --- the tuned params file -----------------------------------------------------------------------


def test_tuned_params_round_trip_and_same_bytes(tmp_path):
    s = _settings(space=SPACE)
    tuned = TunedParams({"optimizer": "sgd", "lr_head": 0.0023, "epochs_head": 2})
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    tuned.write(a, searched=True)
    TunedParams(dict(reversed(tuned.train.items()))).write(b, searched=True)
    assert a.read_bytes() == b.read_bytes()
    assert yaml.safe_load(a.read_text()) == {"train": tuned.train}
    applied = TunedParams.read(a).apply(s, a)
    assert (applied.train.optimizer, applied.train.lr_head, applied.train.epochs_head) == (
        "sgd",
        0.0023,
        2,
    )
    assert applied.train.batch_size == s.train.batch_size


def test_tuned_params_from_another_search_or_bad_are_refused(tmp_path):
    s = _settings(space=SPACE)
    f = tmp_path / "tuned.yaml"
    with pytest.raises(TunedParamsError, match=r"not found: tune\.enabled is true"):
        TunedParams.read(f)
    TunedParams({"lr_head": 0.001}).write(f, searched=True)
    with pytest.raises(TunedParamsError, match="from another search; run `dvc repro tune`"):
        TunedParams.read(f).apply(s, f)
    TunedParams({"lr_head": 5.0, "optimizer": "sgd", "epochs_head": 2}).write(f, searched=True)
    with pytest.raises(TunedParamsError, match=r"tuned.yaml: train.lr_head: Input should be"):
        TunedParams.read(f).apply(s, f)


def test_training_uses_the_tuned_values_only_when_tuning_is_on(tmp_path):
    paths = Paths().under(tmp_path)
    on = _settings(space=SPACE)
    TunedParams({"lr_head": 0.004, "optimizer": "sgd", "epochs_head": 2}).write(
        paths.tuned_params, searched=True
    )
    assert effective_settings(on, paths).train.lr_head == 0.004
    off = _settings({"tune.enabled": False}, space=SPACE)
    assert effective_settings(off, paths) is off  # a stale file never overrides params.yaml


# --- the stage with tuning off, and --apply ------------------------------------------------------


def test_tuning_off_passes_params_through_in_seconds_without_tensorflow(tmp_path):
    params = shrink(real_params())
    assert params["tune"]["enabled"] is False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    code = (
        "import sys, time; t = time.monotonic(); from genderclf.cli import app\n"
        "try: app(['tune'])\nexcept SystemExit as e: assert e.code == 0, e\n"
        "print('heavy', sorted(m for m in ('tensorflow', 'keras', 'optuna', 'mlflow') "
        "if m in sys.modules), round(time.monotonic() - t, 2))"
    )
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "heavy []" in out.stdout, out.stdout
    assert time.monotonic() - t0 < 30  # seconds (about one on an idle machine)
    tuned = yaml.safe_load((tmp_path / "params/tuned.yaml").read_text())
    assert tuned == {"train": {k: params["train"][k] for k in params["tune"]["space"]}}
    assert json.loads((tmp_path / "metrics/tune.json").read_text()) == {"enabled": False}


def test_apply_writes_the_winner_into_params_yaml_keeping_its_comments(tmp_path):
    from genderclf.services import apply_tuned

    paths = Paths().under(tmp_path)
    original = (REPO_ROOT / "params.yaml").read_text()
    paths.params.write_text(original.replace("enabled: false ", "enabled: true  ", 1))
    TunedParams({**_defaults_of_space(), "lr_head": 0.0042, "optimizer": "sgd"}).write(
        paths.tuned_params, searched=True
    )
    changed = apply_tuned(paths.tuned_params, paths.params)
    assert changed == {"lr_head": (0.001, 0.0042), "optimizer": ("adam", "sgd")}
    text = paths.params.read_text()
    assert "  lr_head: 0.0042\n" in text
    assert "  optimizer: sgd          # adam | adamw | sgd\n" in text  # its comment stays
    assert "tune:                     # `genderclf tune`" in text
    s = parse_settings(yaml.safe_load(text))
    assert (s.train.lr_head, s.train.optimizer, s.tune.enabled) == (0.0042, "sgd", False)
    # every other line is as it was (bar the YAML writer's `null` spelling: as dvc exp run -S)
    before, after = original.splitlines(), text.splitlines()
    assert len(before) == len(after)
    differ = [(a, b) for a, b in zip(before, after, strict=True) if a != b and ": null" not in a]
    # (the file had tune.enabled: true; apply set it back to the original's false)
    assert [b.split("#")[0].strip() for _, b in differ] == ["lr_head: 0.0042", "optimizer: sgd"]


def _defaults_of_space() -> dict:
    raw = real_params()
    return {k: raw["train"][k] for k in raw["tune"]["space"]}


def test_apply_without_a_search_says_what_to_run(tmp_path):
    from genderclf.services import apply_tuned

    paths = Paths().under(tmp_path)
    paths.params.write_text((REPO_ROOT / "params.yaml").read_text())
    with pytest.raises(TunedParamsError, match="run `dvc repro tune`"):
        apply_tuned(paths.tuned_params, paths.params)
    assert paths.params.read_text() == (REPO_ROOT / "params.yaml").read_text()


def test_paths_of_the_stage_are_in_dvc_yaml():
    stage = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    p = Paths()
    assert {next(iter(o)) for o in stage["tune"]["outs"]} == {p.tuned_params.as_posix()}
    assert {next(iter(o)) for o in stage["tune"]["metrics"]} == {p.tune_metrics.as_posix()}
    files = [d for d in stage["train"]["params"] if isinstance(d, dict)]
    assert files == [{p.tuned_params.as_posix(): ["train"]}]
    assert "tune.enabled" in stage["train"]["params"]
    # the later stages read what the model was trained with from models/model.json
    for reader in ("evaluate", "register"):
        assert not [d for d in stage[reader]["params"] if isinstance(d, dict)], reader
    assert Path(p.tune_studies).parts[0] == ".cache"  # outside DVC's outputs
