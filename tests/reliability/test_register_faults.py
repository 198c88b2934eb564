"""The register stage against a real `mlflow server`: the server going down, and two
register runs promoting at the same time.

Candidates are untrained small CNNs (a few seeds apart, so their accuracies on the prepared
test split differ), logged to their own runs: no training needed.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.helpers import BIN
from tests.helpers.stages import register as run_register

from genderclf import promotion
from genderclf.config import Settings
from genderclf.tracking import registry
from genderclf.tracking.setup import CHAMPION, MODEL_NAME, TrackingError

pytestmark = pytest.mark.integration


# A floor both constant candidates clear, so the champion question is only "which"
# (the accuracy policy alone: the rest of the gate has its own tests).
REGISTER = {
    "register.min_accuracy": 0.05,
    "register.retries": 1,
    "register.alpha": None,
    "register.max_slice_drop": 1.0,
    "register.max_ece": 1.0,
    "register.serving_check_images": 0,
}


@pytest.fixture
def reg_settings(model_settings) -> Settings:
    return model_settings(REGISTER)


def build_candidate(settings: Settings, prepared: Path, seed: int) -> tuple[Any, float, Any]:
    """An untrained small CNN, its real accuracy on the prepared test split, its answers."""
    import keras

    from genderclf.model.backbones import build_model
    from genderclf.model.scoring import predict_split

    keras.utils.set_random_seed(seed)
    model = build_model(settings.train, settings.base.image_size)
    names, y, p = predict_split(model, prepared, "test", 64)
    return model, float(((p >= 0.5).astype(int) == y).mean()), (names, y, (p >= 0.5).astype(int))


def log_candidate(
    settings: Settings, model: Any, accuracy: float, answers: Any, folder: Path
) -> None:
    """Log the model to a new run; write models/run.json, models/model.keras, eval.json
    and predictions.csv (the evaluate stage's record of these answers)."""
    from tests.helpers.stages import log_model_run, write_evaluation

    # model.keras, model.json and run.json as the train stage writes them
    log_model_run(model, settings, folder / "models")
    names, y, pred = answers
    assert write_evaluation(
        folder / "metrics", names, y, pred=pred, plots=folder / "plots"
    ) == pytest.approx(accuracy)


def _register(settings: Settings, folder: Path, prepared: Path, splits: Path) -> dict[str, Any]:
    return run_register(
        settings,
        folder / "models" / "run.json",
        folder / "metrics" / "eval.json",
        prepared,
        folder / "reports" / "register.json",
        splits,
        folder / "plots",
    )


def _versions() -> list[Any]:
    from mlflow import MlflowClient

    return sorted(
        MlflowClient().search_model_versions(f"name='{MODEL_NAME}'"), key=lambda v: int(v.version)
    )


def _champion() -> str:
    from mlflow import MlflowClient

    return str(MlflowClient().get_model_version_by_alias(MODEL_NAME, CHAMPION).version)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


# --- nothing left behind -----------------------------------------------------------------------


def test_the_serving_check_through_a_server_leaves_no_download_behind(
    use_server, model_settings, prepared, sample_data, tmp_path, monkeypatch
):
    # The check loads the version through the server in a fresh process; with no destination
    # MLflow keeps each download (15 MB) in a new temporary folder for good.
    settings = model_settings({**REGISTER, "register.serving_check_images": 4})
    work = tmp_path / "work"
    log_candidate(settings, *build_candidate(settings, prepared, 1), work)
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))  # the fresh process's
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # this one's
    report = _register(settings, work, prepared, sample_data[1])
    # It ran: the version answered (this untrained candidate's evaluation holds hard labels,
    # not the model's scores, so the answers differ from it and the gate says no).
    (serving,) = [c for c in report["checks"] if c["name"] == "serving"]
    assert "answers 4 test images" in serving["summary"], serving
    assert sorted(p.name for p in temp.iterdir()) == []


# --- tracking server down during register ------------------------------------------------------


def test_server_down_during_register_fails_clearly_and_a_rerun_registers_once(
    use_server, reg_settings, prepared, sample_data, tmp_path, monkeypatch
):
    gate = use_server
    work = tmp_path / "work"
    log_candidate(reg_settings, *build_candidate(reg_settings, prepared, 1), work)
    (work / "data").mkdir()
    (work / "data" / "prepared").symlink_to(prepared, target_is_directory=True)
    (work / "params.yaml").write_text(
        yaml.safe_dump(reg_settings.model_dump(by_alias=True), sort_keys=False)
    )
    on_disk = _snapshot(work)

    # 1. Down before the stage starts: the CLI fails after its bounded retries, one line
    #    naming the URI, no traceback; nothing on disk changes.
    gate.down()
    started = time.monotonic()
    proc = subprocess.run(
        [str(BIN / "genderclf"), "register"], cwd=work, capture_output=True, text=True, timeout=300
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"error (register): MLflow tracking server at {gate.uri} did not answer" in proc.stderr
    assert "after 2 attempts" in proc.stderr  # register.retries = 1
    assert elapsed < 120  # bounded: HTTP retries off, one backoff of 1 s
    assert _snapshot(work) == on_disk  # model, run.json, eval.json kept
    assert not (work / "reports").exists()

    # 2. Down in the middle: the version is created, then the server dies before the
    #    aliases are set. The stage fails naming the URI, after its retries.
    gate.up()
    real_find = registry.find_or_register

    def find_then_die(*args, **kwargs):
        found = real_find(*args, **kwargs)
        gate.down()
        return found

    monkeypatch.setattr(registry, "find_or_register", find_then_die)
    started = time.monotonic()
    with pytest.raises(TrackingError, match=rf"MLflow model registry at {gate.uri}") as err:
        _register(reg_settings, work, prepared, sample_data[1])
    assert "did not answer after 2 attempts" in str(err.value)
    assert time.monotonic() - started < 60
    monkeypatch.setattr(registry, "find_or_register", real_find)
    assert _snapshot(work) == on_disk
    assert not (work / "reports").exists()

    # 3. Back up: re-running finds the version registered from this run and adds none.
    gate.up()
    report = _register(reg_settings, work, prepared, sample_data[1])
    assert (report["version"], report["newly_registered"]) == ("1", False)
    assert report["decision"] == "promoted" and report["champion_after"] == "1"
    again = _register(reg_settings, work, prepared, sample_data[1])
    assert (again["version"], again["newly_registered"], again["decision"]) == (
        "1",
        False,
        "champion",
    )
    versions = _versions()
    assert [str(v.version) for v in versions] == ["1"]
    run_id = json.loads((work / "models" / "run.json").read_text())["run_id"]
    assert versions[0].run_id == run_id
    assert _champion() == "1"
    assert (work / "models" / "model.keras").read_bytes() == on_disk["models/model.keras"]


# --- two register runs at the same time ---------------------------------------------------------


class PauseAfterDecision:
    """Hold each register thread right after its first promotion decision (the pause point).

    Both threads have then seen the same champion (none) and decided to promote; the test
    releases them one at a time, forcing each interleaving on purpose.
    """

    def __init__(self, monkeypatch):
        self.real = promotion.decide
        self.decided = {n: threading.Event() for n in ("better", "worse")}
        self.go = {n: threading.Event() for n in ("better", "worse")}
        self.calls: dict[str, list[Any]] = {"better": [], "worse": []}
        monkeypatch.setattr(promotion, "decide", self)

    def __call__(self, *args, **kwargs):
        name = threading.current_thread().name
        d = self.real(*args, **kwargs)
        self.calls[name].append((args[1], d.promote))
        if len(self.calls[name]) == 1:
            self.decided[name].set()
            assert self.go[name].wait(120), f"{name} was never released"
        return d


@pytest.mark.parametrize("first", ["better", "worse"])
def test_concurrent_registers_end_on_the_better_candidate(
    use_server, reg_settings, prepared, sample_data, tmp_path, monkeypatch, first
):
    folders = {"better": tmp_path / "better", "worse": tmp_path / "worse"}
    one = build_candidate(reg_settings, prepared, 1)
    other = next(
        c
        for c in (build_candidate(reg_settings, prepared, seed) for seed in range(2, 30))
        if c[1] != one[1]
    )
    worse, better = sorted((one, other), key=lambda c: c[1])
    log_candidate(reg_settings, *better, folders["better"])
    log_candidate(reg_settings, *worse, folders["worse"])

    pause = PauseAfterDecision(monkeypatch)
    reports: dict[str, Any] = {}
    errors: list[BaseException] = []

    def register(name: str) -> None:
        try:
            reports[name] = _register(reg_settings, folders[name], prepared, sample_data[1])
        except BaseException as err:  # surfaced by the main thread
            errors.append(err)

    threads = {n: threading.Thread(target=register, args=(n,), name=n) for n in folders}
    for t in threads.values():
        t.start()
    for name in folders:  # both decided "promote" against the same (empty) champion
        assert pause.decided[name].wait(180), f"{name} never reached its decision"
    assert [c[0] for c in pause.calls["better"]] == [None]
    assert [c[0] for c in pause.calls["worse"]] == [None]
    second = "worse" if first == "better" else "better"
    pause.go[first].set()
    threads[first].join(180)
    pause.go[second].set()
    threads[second].join(180)
    assert not errors, errors

    # two versions, champion on the better one, whatever the order
    versions = {str(v.version): v for v in _versions()}
    assert len(versions) == 2
    by_name = {n: reports[n]["version"] for n in folders}
    assert set(by_name.values()) == set(versions)
    assert _champion() == by_name["better"]
    for n in folders:
        assert reports[n]["champion_after"] in (by_name["better"], by_name[n])
    assert reports[second]["champion_after"] == by_name["better"]

    # the second run re-checked the champion before moving the alias, and said so
    if first == "better":
        assert reports["worse"]["decision"] == "rejected"
        assert reports["worse"]["champion_before"]["version"] == by_name["better"]
        assert reports["worse"]["alias_moves"] == []
        assert [p for _, p in pause.calls["worse"]] == [True, False]
    else:
        assert reports["worse"]["decision"] == "promoted"
        assert reports["better"]["decision"] == "promoted"
        assert reports["better"]["champion_before"]["version"] == by_name["worse"]
        moves = [(m["from"], m["to"]) for m in reports["better"]["alias_moves"]]
        assert moves == [(by_name["worse"], by_name["better"])]
    # both decisions are recorded: on each version, and in each run's report artifact
    from mlflow import MlflowClient

    client = MlflowClient()
    for n in folders:
        tags = client.get_model_version(MODEL_NAME, by_name[n]).tags
        assert tags["decision"] == reports[n]["decision"]
        assert tags["decision_reason"]
        saved = json.loads((folders[n] / "reports" / "register.json").read_text())
        assert saved == reports[n]
        run_id = json.loads((folders[n] / "models" / "run.json").read_text())["run_id"]
        assert client.get_run(run_id).data.tags["registry.decision"] == reports[n]["decision"]


def test_promotion_lock_excludes_times_out_and_takes_over_stale(mlflow_store):
    """The lock around re-check + alias move: one holder at a time, bounded waits."""
    from mlflow import MlflowClient

    from genderclf.tracking.setup import configure

    configure(0)
    client = MlflowClient()
    events: list[str] = []
    with registry.promotion_lock(client, "registry at test"):
        # A second holder waits; with a short timeout it gives up naming the lock.
        with (
            pytest.raises(TrackingError, match=r"promotion-lock.*delete that registered model"),
            registry.promotion_lock(client, "registry at test", timeout=0.5),
        ):
            pass

        def second() -> None:
            with registry.promotion_lock(client, "registry at test", timeout=60):
                events.append("second acquired")

        t = threading.Thread(target=second)
        t.start()
        time.sleep(1.0)
        events.append("first releases")
    t.join(60)
    assert events == ["first releases", "second acquired"]
    # Released: the lock model is gone.
    assert not client.search_registered_models(f"name='{registry.LOCK_MODEL}'")
    # A lock left by a killed process (old `since`) is taken over.
    client.create_registered_model(registry.LOCK_MODEL, tags={"holder": "dead", "since": "0"})
    with registry.promotion_lock(client, "registry at test", timeout=5):
        held = client.get_registered_model(registry.LOCK_MODEL)
        assert held.tags["holder"] != "dead"
