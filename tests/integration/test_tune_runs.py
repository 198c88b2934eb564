"""The search for real: Keras trials on the tiny prepared sample, Optuna's journal on disk, a
real MLflow store, and (slow) a real two-node Ray cluster on loopback.

* a trial below the median of the study is pruned by Optuna's pruner and recorded as
  pruned (study and MLflow), and a search reads only the train and validation splits;
* a `genderclf tune` killed mid-study continues its journal when run again: the killed
  trial is recorded as failed and repeated, the finished ones are kept, and the total is
  the budget; every trial is an MLflow run nested under the search's, which carries the
  best trial, the importances and the plots; the test split's shards are not even on disk;
* on a Ray cluster the trials run at once on both nodes and report to the study.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from tests.helpers import BIN

from genderclf import config as C
from genderclf.config import Paths, Settings
from genderclf.tracking.setup import EXPERIMENT

SPACE = {
    "lr_head": {"low": 0.0003, "high": 0.01, "log": True},
    "optimizer": {"choices": ["adam", "sgd"]},
    "dropout": {"low": 0.0, "high": 0.5, "log": False},
}
# A search small enough for a test: one epoch per trial, pruning from the first epoch.
TINY_SEARCH = {
    "tune.enabled": True,
    "tune.trials": 3,
    "tune.startup_trials": 1,
    "tune.warmup_epochs": 0,
    "tune.pruner": "median",
    "tune.space": SPACE,
    "train.epochs_head": 1,
    "train.epochs_finetune": 0,
}


def _write_params(settings: Settings, path: Path = C.PATHS.params) -> Path:
    path.write_text(yaml.safe_dump(settings.model_dump(by_alias=True), sort_keys=False))
    return path


def _without_test_split(prepared: Path, dest: Path) -> Path:
    """A copy of the prepared data without the test split's shards (meta.json still lists
    them): a search that opened one would fail with TensorFlow's NotFoundError."""
    shutil.copytree(prepared, dest, ignore=shutil.ignore_patterns("test-*"))
    meta = json.loads((dest / "meta.json").read_text())
    assert meta["splits"]["test"]["shards"]
    assert not any((dest / s).exists() for s in meta["splits"]["test"]["shards"])
    return dest


def _cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["GIT_CONFIG_GLOBAL"] = os.devnull
    env.pop("MLFLOW_RUN_ID", None)
    env.pop("RAY_ADDRESS", None)
    return {**env, **(extra or {})}


def _study(journal: Path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(journal)))
    (summary,) = optuna.study.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage)


def _children(client, parent: str) -> dict[int, object]:
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'"
    )
    return {int(r.data.tags["tune.trial"]): r for r in runs}


def _the_search_run(client):
    exp = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([exp.experiment_id], "tags.`genderclf.kind` = 'search'")
    return run


# --- pruning, and what a search reads ------------------------------------------------------------

_OPENED: list[str] = []
_RECORDING: list[bool] = []


def _audit(event: str, args: tuple) -> None:
    if _RECORDING and event == "open" and isinstance(args[0], str | bytes | os.PathLike):
        _OPENED.append(os.fsdecode(args[0]))


@pytest.mark.integration
def test_a_trial_below_the_median_is_pruned_and_only_train_and_val_are_read(
    mlflow_store, model_settings, prepared, sample_data, monkeypatch
):
    from mlflow import MlflowClient

    from genderclf.data import tfrecords
    from genderclf.model.tune import StudyHost
    from genderclf.pipeline import run_tune
    from genderclf.stages import tune as stage

    settings = model_settings({**TINY_SEARCH, "tune.trials": 2})
    raw, splits = sample_data
    paths = Paths(prepared=prepared, raw=raw, splits=splits, params=_write_params(settings))
    # The study already holds a trial that reached perfect validation accuracy: a real
    # trial's first epoch falls below that median, and Optuna's pruner stops it there.
    plan = stage.prepare(settings, paths)
    host = StudyHost(str(plan.journal), plan.name, settings)
    number, _ = host.ask()
    assert not host.report(number, 1, 1.0)
    host.tell(number, "complete", 1.0)
    del host

    read: list[str] = []
    make_dataset = tfrecords.make_dataset

    def recording(prepared_dir, split, *args, **kwargs):
        read.append(split)
        return make_dataset(prepared_dir, split, *args, **kwargs)

    monkeypatch.setattr(tfrecords, "make_dataset", recording)
    sys.addaudithook(_audit)  # Python's own file opens (TensorFlow's are the reader's above)
    _OPENED.clear()
    _RECORDING.append(True)
    try:
        report = run_tune(settings, paths)
    finally:
        _RECORDING.clear()

    assert read and set(read) <= {"train", "val"}, read
    test_files = {str(splits / "test.csv")} | {
        str(prepared / s)
        for s in json.loads((prepared / "meta.json").read_text())["splits"]["test"]["shards"]
    }
    assert not test_files & {str(Path(f).resolve()) for f in _OPENED}
    assert any(f.endswith("meta.json") for f in _OPENED)  # the hook does see the stage's opens

    t0, t1 = report.trials
    assert (t0["state"], t0["value"]) == ("complete", 1.0)
    assert t1["state"] == "pruned" and list(t1["curve"]) == [1] and t1["value"] < 1.0
    assert _study(plan.journal).trials[1].state.name == "PRUNED"
    assert report.metrics["trials"] == {"complete": 1, "pruned": 1, "failed": 0}
    assert report.tuned.train == t0["params"]  # the best trial's values go to train

    client = MlflowClient(mlflow_store)
    parent = _the_search_run(client)
    run = _children(client, parent.info.run_id)[1]
    assert run.data.tags["tune.state"] == "pruned" and run.info.status == "FINISHED"
    assert run.data.params["train.optimizer"] == t1["params"]["optimizer"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/accuracy")] == [1]
    assert run.data.metrics["tune/value"] == pytest.approx(t1["value"], abs=1e-6)


# --- kill and resume, the records of a whole search ---------------------------------------------


def _lines_until(proc: subprocess.Popen, first: str, then: str, timeout: float) -> list[str]:
    """Output lines of `proc` until a line with `then` follows one with `first`."""
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    lines, seen_first = [], False
    try:
        for line in proc.stdout:
            lines.append(line)
            seen_first = seen_first or first in line
            if seen_first and then in line:
                return lines
    finally:
        timer.cancel()
    raise AssertionError(f"no {then!r} after {first!r}:\n{''.join(lines[-60:])}")


@pytest.mark.integration
@pytest.mark.slow  # two `genderclf tune` processes, three one-epoch trials: ~2 min on 2 cores
def test_a_killed_search_continues_and_every_trial_is_a_nested_run(
    mlflow_store, model_settings, prepared
):
    from mlflow import MlflowClient
    from PIL import Image

    settings = model_settings({**TINY_SEARCH, "tune.trials": 2})
    _write_params(settings)
    _without_test_split(prepared, C.PATHS.prepared)
    env = _cli_env({"MLFLOW_TRACKING_URI": mlflow_store})

    proc = subprocess.Popen(
        [str(BIN / "genderclf"), "tune"],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    # trial 0 finished, trial 1 asked for and fitting: kill it there
    _lines_until(proc, "tune: trial 0 ", "train: backend", timeout=300)
    os.kill(proc.pid, signal.SIGKILL)  # no cleanup, no atexit: as an OOM kill or a lost node
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not C.PATHS.tuned_params.exists()

    again = subprocess.run(
        [str(BIN / "genderclf"), "tune"], env=env, text=True, capture_output=True, timeout=600
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "tune: continuing study" in again.stdout and "1 failed so far" in again.stdout
    assert again.stdout.count("tune: trial ") == 1  # the lost trial again: the budget is met

    (journal,) = C.PATHS.tune_studies.glob("*/journal.log")
    trials = _study(journal).trials
    states = [t.state.name for t in trials]
    assert states[1] == "FAIL" and states.count("FAIL") == 1
    assert sum(s in ("COMPLETE", "PRUNED") for s in states) == 2  # the budget
    assert trials[2].params == trials[1].params and trials[2].user_attrs["repeats"] == 1
    assert trials[0].params["lr_head"] == settings.train.lr_head  # params.yaml's values first

    metrics = json.loads(C.PATHS.tune_metrics.read_text())
    assert metrics["trials"]["failed"] == 1
    assert metrics["trials"]["complete"] + metrics["trials"]["pruned"] == 2
    best = trials[metrics["best_trial"]]
    assert best.state.name == "COMPLETE" and best.value == pytest.approx(metrics["best_value"])
    tuned = yaml.safe_load(C.PATHS.tuned_params.read_text())
    assert tuned == {"train": best.params}

    client = MlflowClient(mlflow_store)
    parent = _the_search_run(client)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["tune.best_trial"] == str(metrics["best_trial"])
    assert {f"best.train.{k}" for k in SPACE} <= set(parent.data.params)
    assert parent.data.metrics["tune/best_val_accuracy"] == pytest.approx(best.value, abs=1e-6)
    files = {f.path for f in client.list_artifacts(parent.info.run_id, "plots")}
    assert files == {
        "plots/optimization_history.png",
        "plots/param_importances.png",
        "plots/trials.csv",
    }
    png = client.download_artifacts(parent.info.run_id, "plots/optimization_history.png", ".")
    assert Image.open(png).size[0] > 400

    children = _children(client, parent.info.run_id)
    assert sorted(children) == [0, 1, 2]
    assert children[1].info.status == "FAILED" and children[1].data.tags["tune.state"] == "failed"
    for n in (0, 2):
        run, trial = children[n], trials[n]
        assert run.info.status == "FINISHED"
        assert run.data.tags["tune.state"] == trial.state.name.lower()
        for key, value in trial.params.items():
            assert run.data.params[f"train.{key}"] == str(value)
        history = client.get_metric_history(run.info.run_id, "val/accuracy")
        assert [m.step for m in history] == [1]
    # the study ran without the test split on disk (see _without_test_split)
    assert not list(C.PATHS.prepared.glob("test-*"))


# --- on a Ray cluster --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    """A real Ray cluster on 127.0.0.1: a head and a second node, one CPU each."""
    from tests.helpers.ray_cluster import ray_cluster

    with ray_cluster(cpus=1) as c:
        yield c


@pytest.mark.integration
@pytest.mark.slow  # a two-node Ray cluster and two trials in fresh workers: ~3 min on 2 cores
def test_on_a_ray_cluster_trials_run_at_once_on_both_nodes(
    cluster, mlflow_store, model_settings, prepared
):
    from mlflow import MlflowClient

    settings = model_settings({**TINY_SEARCH, "tune.trials": 2, "tune.parallel_trials": 2})
    _write_params(settings)
    _without_test_split(prepared, C.PATHS.prepared)
    env = _cli_env({"MLFLOW_TRACKING_URI": mlflow_store, **cluster.driver_env()})
    run = subprocess.run(
        [str(BIN / "genderclf"), "tune"], env=env, text=True, capture_output=True, timeout=900
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "tune: on the Ray cluster, 2 trials at once, 1 CPUs each" in run.stdout

    (journal,) = C.PATHS.tune_studies.glob("*/journal.log")  # the journal stays here
    trials = _study(journal).trials
    assert [t.state.name in ("COMPLETE", "PRUNED") for t in trials] == [True, True]
    nodes = {t.user_attrs["node"] for t in trials}
    assert len(nodes) == 2  # one CPU per node, one per trial: both ran at once
    assert json.loads(C.PATHS.tune_metrics.read_text())["best_trial"] in (0, 1)

    client = MlflowClient(mlflow_store)
    children = _children(client, _the_search_run(client).info.run_id)
    assert {r.data.tags["tune.node"] for r in children.values()} == nodes
    for n, r in children.items():
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val/loss")] == [1], n
    # the cluster's processes listen on loopback only
    assert {host for host, _, _ in cluster.listening()} <= {"127.0.0.1", "[::ffff:127.0.0.1]"}


# --- the backbone comparison -------------------------------------------------------------------


@pytest.mark.integration
def test_compare_backbones_measures_every_backbone_with_the_accuracy_of_those_trained(
    mlflow_store, model_settings, tmp_path
):
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param
    from PIL import Image

    from genderclf.model.backbones import BACKBONES, build_model
    from genderclf.model.stats import wilson
    from genderclf.tracking.compare import compare_backbones
    from genderclf.tracking.setup import configure

    configure()
    client = MlflowClient(mlflow_store)
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    # a trial of a search (simple_cnn) and a training run (mobilenet_v2), as they log
    trial = client.create_run(exp, tags={"genderclf.kind": "trial", "tune.trial": "0"})
    client.log_batch(
        trial.info.run_id,
        metrics=[Metric("tune/val_accuracy", 0.8, 0, 0)],
        params=[Param("train.backbone", "simple_cnn"), Param("data.val_images", "100")],
    )
    training = client.create_run(exp)
    curve = [(1, 0.6, 0.70), (2, 0.4, 0.78), (3, 0.5, 0.80)]  # (epoch, val loss, val acc)
    client.log_batch(
        training.info.run_id,
        metrics=[Metric("val/loss", loss, 0, e) for e, loss, _ in curve]
        + [Metric("val/accuracy", acc, 0, e) for e, _, acc in curve],
        params=[Param("train.backbone", "mobilenet_v2"), Param("data.val_images", "50")],
    )

    settings = model_settings()
    plot = tmp_path / "backbones.png"
    out = compare_backbones(settings, 32, 1, plot)
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.split()}
    assert set(BACKBONES) <= set(rows)
    simple = build_model(settings.train.model_copy(update={"weights": None}), 32)
    assert f"{simple.count_params() / 1e6:.2f}M" in rows["simple_cnn"]
    lo, hi = wilson(80, 100)
    assert f"0.8000 [{lo:.3f}, {hi:.3f}]" in rows["simple_cnn"]
    # a training run counts with the epoch train keeps (lowest val loss: epoch 2)
    lo, hi = wilson(39, 50)
    assert f"0.7800 [{lo:.3f}, {hi:.3f}]" in rows["mobilenet_v2"]
    assert "not trained" in rows["vgg16"] and "not trained" in rows["resnet50"]
    assert Image.open(plot).size[0] > 800

    (run,) = client.search_runs([exp], "tags.`genderclf.kind` = 'backbones'")
    for name in BACKBONES:
        assert run.data.metrics[f"cost/{name}/latency_ms"] > 0
        assert run.data.metrics[f"cost/{name}/size_mb"] > 0
    assert run.data.metrics["cost/vgg16/params"] > run.data.metrics["cost/simple_cnn/params"]
    files = {f.path for f in client.list_artifacts(run.info.run_id, "plots")}
    assert files == {"plots/backbones.png", "plots/backbones.csv"}
    # measurements of this machine: nothing of them in the pipeline's outputs
    assert not Path("metrics").exists() and not Path("params").exists()
