"""The register stage: promotion policy and the MLflow Model Registry, for real.

`decide` is checked as a pure function. `run_register` runs against a real MLflow SQLite
store in a temporary folder with real Keras models: each candidate is an untrained small
CNN logged to its own run. The candidate's accuracy comes from its eval.json (which the
test controls); the champion's is measured by the stage on the prepared test split, and
the test measures it independently to set up better / worse / equal candidates.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import keras
import pytest
from tests.helpers.stages import register as run_register

from genderclf import config as C
from genderclf.config import Settings
from genderclf.promotion import decide
from genderclf.tracking.setup import CHALLENGER, CHAMPION, MODEL_NAME, TrackingError

# --- the policy as a pure function -------------------------------------------------------------


@pytest.mark.parametrize(
    ("candidate", "champion", "floor", "min_improvement", "promote", "reason"),
    [
        (0.95, None, 0.9, 0.0, True, "no champion yet"),
        (0.90, None, 0.9, 0.0, True, "meets the floor"),  # the floor itself is enough
        (0.89, None, 0.9, 0.0, False, "below register.min_accuracy"),
        (0.95, 0.93, 0.9, 0.0, True, "beats the champion's 0.9300"),
        (0.92, 0.93, 0.9, 0.0, False, "does not beat the champion's 0.9300"),
        (0.93, 0.93, 0.9, 0.0, False, "delta +0.0000"),  # equal: keep the champion
        (0.85, 0.50, 0.9, 0.0, False, "below register.min_accuracy"),  # better, under floor
        (0.95, 0.94, 0.9, 0.02, False, "register.min_improvement=0.02"),
        (0.97, 0.94, 0.9, 0.02, True, "by +0.0300"),
        # exactly the minimum improvement, as counts give it: 94 vs 92 right of 100
        # (in floating point 94/100 - 92/100 is 0.0199999...)
        (94 / 100, 92 / 100, 0.9, 0.02, True, "by +0.0200"),
        (94 / 100, 93 / 100, 0.9, 0.01, True, "by +0.0100"),
    ],
)
def test_decide(candidate, champion, floor, min_improvement, promote, reason):
    d = decide(candidate, champion, floor, min_improvement)
    assert d.promote is promote
    assert len(d.reasons) == 1 and reason in d.reasons[0]


# --- run_register against a real store ---------------------------------------------------------


# The accuracy policy alone: no significance test, slice or calibration ceiling, serving
# check (those have their own tests in test_promotion_gate.py).
ACCURACY_POLICY = {
    "register.min_improvement": 0.0,
    "register.alpha": None,
    "register.max_slice_drop": 1.0,
    "register.max_ece": 1.0,
    "register.serving_check_images": 0,
}


@pytest.fixture
def reg_settings(model_settings) -> Settings:
    # A low floor, so that candidates worse than an untrained champion still clear it.
    return model_settings({"register.min_accuracy": 0.05, **ACCURACY_POLICY})


class Candidates:
    """Untrained small CNNs, each logged to its own MLflow run, with run.json and the
    evaluate stage's record (eval.json, predictions.csv) of the accuracy the test asks for."""

    def __init__(self, settings: Settings, prepared: Path, splits: Path):
        self.settings, self.prepared, self.splits, self.n = settings, prepared, splits, 0

    def new(self, accuracy: float, threshold: float = 0.5) -> tuple[Path, Path, float]:
        """Returns (run.json, eval.json, the model's real accuracy on the test split)."""

        from tests.helpers.stages import log_model_run, write_evaluation

        from genderclf.model.backbones import build_model
        from genderclf.model.scoring import predict_split

        self.n += 1
        keras.utils.set_random_seed(self.n)
        model = build_model(self.settings.train, self.settings.base.image_size)
        names, y, p = predict_split(model, self.prepared, "test", 64)
        real = float(((p >= threshold).astype(int) == y).mean())
        folder = Path(f"candidate{self.n}")
        log_model_run(model, self.settings, folder)
        write_evaluation(folder, names, y, accuracy, threshold)
        return folder / "run.json", folder / "eval.json", real

    def register(self, run_file: Path, eval_file: Path, settings: Settings | None = None):
        report = run_register(
            settings or self.settings,
            run_file,
            eval_file,
            self.prepared,
            C.PATHS.register_report,
            self.splits,
        )
        assert json.loads(C.PATHS.register_report.read_text()) == report
        return report


@pytest.fixture
def candidates(mlflow_store, reg_settings, prepared, sample_data) -> Candidates:
    return Candidates(reg_settings, prepared, sample_data[1])


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def _alias(alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(_client().get_model_version_by_alias(MODEL_NAME, alias).version)
    except MlflowException:
        return None


def _versions() -> list[Any]:
    return sorted(
        _client().search_model_versions(f"name='{MODEL_NAME}'"), key=lambda v: int(v.version)
    )


def _tags(version: str) -> dict[str, str]:
    return _client().get_model_version(MODEL_NAME, version).tags


@pytest.mark.integration
def test_promotion_policy_end_to_end(candidates, monkeypatch):
    # 1. the first model that meets the floor becomes champion
    run_a, eval_a, real_a = candidates.new(accuracy=0.95)
    r = candidates.register(run_a, eval_a)
    run_id_a = json.loads(run_a.read_text())["run_id"]
    assert r["version"] == "1" and r["newly_registered"] is True
    assert r["decision"] == "promoted"
    assert r["champion_before"] == {"version": None, "accuracy": None}
    assert r["champion_after"] == "1"
    assert "no champion yet" in r["reasons"][0]
    assert r["policy"] == {
        "min_accuracy": 0.05,
        "min_improvement": 0.0,
        "alpha": None,
        "max_slice_drop": 1.0,
        "max_ece": 1.0,
        "approval": "auto",
    }
    assert r["candidate"]["accuracy"] == pytest.approx(0.95, abs=0.01) and r["run_id"] == run_id_a
    assert [(m["alias"], m["from"], m["to"]) for m in r["alias_moves"]] == [(CHAMPION, None, "1")]
    assert _alias(CHAMPION) == "1" and _alias(CHALLENGER) == "1"
    tags = _tags("1")
    assert tags["run_id"] == run_id_a
    assert float(tags["accuracy"]) == pytest.approx(0.95, abs=0.01)
    assert float(tags["threshold"]) == 0.5
    assert tags["decision"] == "promoted"
    move = json.loads(tags[f"alias.{CHAMPION}.set"])
    assert (move["from"], move["to"]) == (None, "1")
    assert move["by"] and move["at"] and "no champion yet" in move["reason"]
    # the training run links to its registry entry and carries the report
    run = _client().get_run(run_id_a)
    assert run.data.tags["registry.version"] == "1"
    assert run.data.tags["registry.decision"] == "promoted"
    assert "registry/register.json" in {
        a.path for a in _client().list_artifacts(run_id_a, "registry")
    }

    # 2. worse than the champion, measured on the same test split: stays challenger
    from tests.helpers.stages import count_reads

    from genderclf.contracts import PreparedData

    run_b, eval_b, _ = candidates.new(accuracy=real_a - 0.04)
    reads = count_reads(monkeypatch, PreparedData)
    r = candidates.register(run_b, eval_b)
    assert len(reads) == 1  # meta.json once, though the champion is scored on its data too
    assert (r["version"], r["decision"], r["champion_after"]) == ("2", "rejected", "1")
    assert r["champion_before"] == {"version": "1", "accuracy": pytest.approx(real_a)}
    assert "does not beat the champion's" in r["reasons"][0]
    assert r["alias_moves"] == []
    assert _alias(CHAMPION) == "1" and _alias(CHALLENGER) == "2"
    assert _tags("2")["decision"] == "rejected"
    assert f"alias.{CHAMPION}.set" not in _tags("2")

    # 3. exactly as good as the champion: no churn
    run_c, eval_c, _ = candidates.new(accuracy=real_a)
    r = candidates.register(run_c, eval_c)
    assert (r["version"], r["decision"], r["champion_after"]) == ("3", "rejected", "1")
    assert "delta +0.0000" in r["reasons"][0]

    # 4. better: promoted, and the move is recorded on both versions
    run_d, eval_d, _ = candidates.new(accuracy=min(1.0, real_a + 0.2))
    r = candidates.register(run_d, eval_d)
    assert (r["version"], r["decision"], r["champion_after"]) == ("4", "promoted", "4")
    assert "beats the champion's" in r["reasons"][0]
    assert [(m["from"], m["to"]) for m in r["alias_moves"]] == [("1", "4")]
    assert _alias(CHAMPION) == "4" and _alias(CHALLENGER) == "4"
    moved_in = json.loads(_tags("4")[f"alias.{CHAMPION}.set"])
    moved_out = json.loads(_tags("1")[f"alias.{CHAMPION}.removed"])
    assert moved_in == moved_out and (moved_in["from"], moved_in["to"]) == ("1", "4")
    # version 1 keeps the record of its own promotion
    assert json.loads(_tags("1")[f"alias.{CHAMPION}.set"])["to"] == "1"
    # the registered model's page: the last move as one line of text
    last = _client().get_registered_model(MODEL_NAME).tags[f"last_move.{CHAMPION}"]
    assert last.startswith("version 4 (was version 1), by ") and "\n" not in last
    assert moved_in["at"] in last and moved_in["reason"].split("; ")[0][:100] in last
    assert len(last) < 250

    # 5. registering the same run again creates no second version
    r = candidates.register(run_d, eval_d)
    assert (r["version"], r["newly_registered"], r["decision"]) == ("4", False, "champion")
    assert "already the champion" in r["reasons"][0]
    assert r["alias_moves"] == []
    r = candidates.register(run_b, eval_b)
    assert (r["version"], r["newly_registered"], r["decision"]) == ("2", False, "rejected")
    assert _alias(CHAMPION) == "4"
    versions = _versions()
    assert [str(v.version) for v in versions] == ["1", "2", "3", "4"]
    assert len({v.run_id for v in versions}) == 4


@pytest.mark.integration
def test_below_the_floor_is_never_promoted(candidates, reg_settings):
    strict = reg_settings.model_copy(
        update={"register_": reg_settings.registry.model_copy(update={"min_accuracy": 0.9})}
    )
    run_a, eval_a, _ = candidates.new(accuracy=0.85)
    r = candidates.register(run_a, eval_a, strict)
    assert (r["version"], r["decision"], r["champion_after"]) == ("1", "rejected", None)
    assert "below register.min_accuracy 0.9000" in r["reasons"][0]
    assert _alias(CHAMPION) is None and _alias(CHALLENGER) == "1"
    assert f"alias.{CHAMPION}.set" not in _tags("1")
    # the first one above the floor then becomes champion
    run_b, eval_b, _ = candidates.new(accuracy=0.93)
    r = candidates.register(run_b, eval_b, strict)
    assert (r["version"], r["decision"], r["champion_after"]) == ("2", "promoted", "2")


@pytest.mark.integration
def test_min_improvement_keeps_a_champion_that_is_only_slightly_worse(candidates, reg_settings):
    run_a, eval_a, real_a = candidates.new(accuracy=0.95)
    candidates.register(run_a, eval_a)
    picky = reg_settings.model_copy(
        update={"register_": reg_settings.registry.model_copy(update={"min_improvement": 0.1})}
    )
    run_b, eval_b, _ = candidates.new(accuracy=real_a + 0.05)
    r = candidates.register(run_b, eval_b, picky)
    assert (r["decision"], r["champion_after"]) == ("rejected", "1")
    assert "register.min_improvement=0.1" in r["reasons"][0]
    run_c, eval_c, _ = candidates.new(accuracy=real_a + 0.15)
    r = candidates.register(run_c, eval_c, picky)
    assert (r["decision"], r["champion_after"]) == ("promoted", "3")


def _trained_model(settings: Settings, folder: Path) -> None:
    """The train stage's model.json for a model no MLflow run holds."""
    from genderclf.contracts import ModelInput, TrainedModel

    TrainedModel(ModelInput(32, "center_crop"), "0" * 32, 0, settings.train.model_dump()).write(
        folder / "model.json"
    )


def test_missing_inputs_name_the_stage_to_run(mlflow_store, reg_settings, prepared, tmp_path):
    run_file, eval_file = tmp_path / "run.json", tmp_path / "eval.json"
    with pytest.raises(FileNotFoundError, match=r"run `dvc repro train`"):
        run_register(reg_settings, run_file, eval_file, prepared, C.PATHS.register_report)
    _trained_model(reg_settings, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"run `dvc repro evaluate`"):
        run_register(reg_settings, run_file, eval_file, prepared, C.PATHS.register_report)
    assert not C.PATHS.register_report.exists()


def test_unreachable_registry_fails_after_register_retries(
    mlflow_store, reg_settings, prepared, tmp_path, monkeypatch
):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    _trained_model(reg_settings, tmp_path)
    from tests.helpers.stages import write_evaluation

    write_evaluation(tmp_path, ["a.jpg", "b.jpg"], [1, 0], 1.0)
    settings = reg_settings.model_copy(
        update={"register_": reg_settings.registry.model_copy(update={"retries": 2})}
    )
    started = time.monotonic()
    with pytest.raises(TrackingError, match=rf"{uri} did not answer after 3 attempts"):
        run_register(
            settings,
            tmp_path / "run.json",
            tmp_path / "eval.json",
            prepared,
            C.PATHS.register_report,
        )
    assert time.monotonic() - started >= 1 + 2  # backoff between the attempts
    assert not C.PATHS.register_report.exists()


@pytest.mark.integration
def test_compare_marks_the_champion_and_lists_every_alias(candidates):
    """`genderclf compare` against a real registry: three versions, the champion moved."""
    from typer.testing import CliRunner

    from genderclf.cli import app

    run_a, eval_a, real_a = candidates.new(accuracy=0.95)
    candidates.register(run_a, eval_a)  # v1 champion
    run_b, eval_b, _ = candidates.new(accuracy=min(1.0, real_a + 0.2))
    candidates.register(run_b, eval_b)  # v2 champion (moved from v1)
    run_c, eval_c, _ = candidates.new(accuracy=real_a - 0.04)
    candidates.register(run_c, eval_c)  # v3 challenger, rejected
    assert (_alias(CHAMPION), _alias(CHALLENGER)) == ("2", "3")

    result = CliRunner().invoke(app, ["compare"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = lines[0].split()
    assert header[:3] == ["version", "aliases", "decision"] and "test/accuracy" in header
    rows = {line.split()[0]: line.split() for line in lines[1:4]}
    assert set(rows) == {"3", "*2", "1"}, lines
    assert rows["*2"][1:3] == ["champion", "promoted"]
    assert rows["3"][1:3] == ["challenger", "rejected"]
    assert rows["1"][1:3] == ["-", "promoted"]
    assert lines[-1] == "(* = champion)"
    runs = CliRunner().invoke(app, ["compare", "--runs", "5"])
    assert runs.exit_code == 0 and len(runs.output.splitlines()) == 1 + 3, runs.output


def test_the_training_run_is_found_by_the_models_hash(mlflow_store, reg_settings, tmp_path):
    """models/run.json is outside DVC's outputs (issue 21): where it is missing (a fresh
    clone after `dvc pull`) or names another model (after `dvc checkout`), the run that
    holds the model is found in MLflow by the model's MD5; no run, one clear error."""
    from tests.helpers.stages import log_model_run

    from genderclf.contracts import TrainedModel, TrainingRun
    from genderclf.model.backbones import build_model
    from genderclf.tracking.runs import training_run
    from genderclf.tracking.setup import configure

    def model(seed: int, folder: Path) -> tuple[TrainedModel, dict[str, Any]]:
        keras.utils.set_random_seed(seed)
        net = build_model(reg_settings.train, reg_settings.base.image_size)
        run = log_model_run(net, reg_settings, folder)
        return TrainedModel.read(folder / "model.json"), run

    a, run_a = model(1, tmp_path / "a")
    b, run_b = model(2, tmp_path / "b")
    configure(0)
    record = tmp_path / "a" / "run.json"
    assert training_run(a, record) == TrainingRun.read(record)  # the record of this model
    record.unlink()
    assert training_run(a, record).run_id == run_a["run_id"]  # no record: the tag
    found = training_run(b, record.with_name("other.json"))
    assert (found.run_id, found.keras_model_uri) == (run_b["run_id"], run_b["keras_model_uri"])
    # a record of another model is never used
    assert training_run(a, tmp_path / "b" / "run.json").run_id == run_a["run_id"]
    stranger = TrainedModel(a.input, "f" * 32, a.seed, a.train)
    with pytest.raises(TrackingError, match=r"no MLflow run .* holds the trained model \(md5 f+\)"):
        training_run(stranger, record)
