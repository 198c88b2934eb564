"""The whole pipeline through the real `dvc repro`, in a temporary git repository.

As tests/integration/test_dvc_pipeline.py, with a params.yaml shrunk for the model stages
too (small CNN at 32px, one epoch per phase) and MLflow on its default store: no
MLFLOW_TRACKING_URI, so `sqlite:///mlflow.db` in the repository root.
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.helpers import BIN
from tests.helpers.workspace import copy_pipeline
from tests.helpers.workspace import dvc as _dvc
from tests.helpers.workspace import git_commit as _commit
from tests.helpers.workspace import pipeline_env as _env
from tests.helpers.workspace import run as _run
from tests.helpers.workspace import status_stages as _status_stages
from tests.helpers.workspace import write_params as _write_params

from genderclf import config as C
from genderclf.tracking.setup import CHALLENGER, CHAMPION, MODEL_NAME

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STAGES = ("download", "validate", "split", "augment", "train", "evaluate", "register")
MODEL_STAGES = {"train", "evaluate", "register"}
# download runs on every `dvc repro` (`always_changed`; it keeps an unchanged source's data)
ALWAYS = {"download"}


def _ran(output: str) -> set[str]:
    return {s for s in STAGES if f"Running stage '{s}'" in output}


def _skipped(output: str) -> set[str]:
    return {s for s in STAGES if f"Stage '{s}' didn't change" in output}


def _client(repo: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{repo / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(scope="module")
def pipeline(
    tmp_path_factory, pipeline_params
) -> tuple[Path, subprocess.CompletedProcess[str], str]:
    """A git repo with the pipeline after a first full `dvc repro`, committed as a user
    would (dvc.lock, metrics); also the commit the run was made from."""
    repo = tmp_path_factory.mktemp("full") / "repo"
    copy_pipeline(repo)
    _write_params(repo, pipeline_params)
    _run(repo, "git", "init", "-q")
    code = _commit(repo, "pipeline")
    first = _dvc(repo, "repro")
    _commit(repo, "first run")
    return repo, first, code


def test_first_repro_runs_every_stage_and_registers_a_champion(pipeline):
    repo, first, code = pipeline
    assert _ran(first.stdout) == set(STAGES)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)

    # train
    for out in (
        C.PATHS.model,
        C.PATHS.run,
        C.PATHS.train_metrics,
        C.PATHS.history,
    ):
        assert (repo / out).is_file(), out
    # evaluate: the metric keys users rely on, and slices (the sample has attributes)
    ev = json.loads((repo / C.PATHS.eval_metrics).read_text())
    for key in ("accuracy", "precision", "recall", "f1", "roc_auc"):
        assert isinstance(ev[key], float) and 0.0 <= ev[key] <= 1.0, key
    assert ev["n"] == len((repo / C.PATHS.splits / "test.csv").read_text().splitlines()) - 1
    assert {"Young", "Eyeglasses"} <= set(ev["slices"]["by_attribute"])
    for png in ("confusion_matrix", "roc", "pr", "calibration", "slices", "mistakes"):
        assert (repo / C.PATHS.plots / f"{png}.png").stat().st_size > 0, png
    # register
    report = json.loads((repo / C.PATHS.register_report).read_text())
    assert (report["version"], report["decision"], report["champion_after"]) == (
        "1",
        "promoted",
        "1",
    )
    run_id = json.loads((repo / C.PATHS.run).read_text())["run_id"]
    assert report["run_id"] == run_id

    client = _client(repo)
    champion = client.get_model_version_by_alias(MODEL_NAME, CHAMPION)
    assert str(champion.version) == "1" and champion.run_id == run_id
    assert str(client.get_model_version_by_alias(MODEL_NAME, CHALLENGER).version) == "1"
    # one MLflow run holds the whole lineage: params, test metrics, data and code versions
    run = client.get_run(run_id)
    assert run.data.params["train.backbone"] == "simple_cnn"
    assert run.data.metrics["test/accuracy"] == pytest.approx(ev["accuracy"], abs=1e-6)
    tags = run.data.tags
    assert tags["git_commit"] == code
    assert tags["git_dirty"] == "false"
    prepared_md5 = next(
        o["md5"] for o in lock["stages"]["augment"]["outs"] if o["path"] == "data/prepared"
    )
    assert tags["dvc_prepared_md5"] == prepared_md5
    source = json.loads((repo / C.PATHS.source_file).read_text())
    assert tags["data_checksum"] == source["checksum"]
    assert tags["registry.version"] == "1"

    shown = _dvc(repo, "metrics", "show", "--json").stdout
    metrics = json.loads(shown)
    found = json.dumps(metrics)
    assert "metrics/eval.json" in found and "metrics/train.json" in found
    assert f"{ev['accuracy']}" in found or f"{round(ev['accuracy'], 5)}" in found


def test_training_again_leaves_the_pipeline_up_to_date(pipeline):
    """`dvc repro --force --single-item train` with nothing changed (train.deterministic is
    on on a CPU): the same bytes for every output DVC hashes, so `dvc status` stays clean
    and evaluate and register are not due again. The new MLflow run is named by
    models/run.json, which DVC does not hash (issue 21)."""
    repo, _, _ = pipeline
    lock = (repo / "dvc.lock").read_text()
    run_before = json.loads((repo / C.PATHS.run).read_text())
    again = _dvc(repo, "repro", "--force", "--single-item", "train")
    assert _ran(again.stdout) == {"train"}
    assert (repo / "dvc.lock").read_text() == lock
    status = _dvc(repo, "status").stdout
    assert _status_stages(status) <= ALWAYS, status
    run_after = json.loads((repo / C.PATHS.run).read_text())
    assert run_after["run_id"] != run_before["run_id"]  # a new training run, same model
    assert run_after["model_md5"] == run_before["model_md5"]


def test_drift_check_against_the_pipelines_champion(pipeline):
    """The champion `dvc repro` registered carries its reference, and `genderclf drift`
    loads it. This pipeline's test split is tiny (12 images of 3 people), so the check
    refuses to judge, and says why, rather than alarming on noise (it did, on the mean
    confidence, before the reference size was checked)."""
    from genderclf.monitor.profile import Profile
    from genderclf.tracking.registry import REFERENCE_TAG

    repo, _, _ = pipeline
    ref = Profile.load(repo / C.PATHS.reference)
    test_rows = len((repo / C.PATHS.splits / "test.csv").read_text().splitlines()) - 1
    assert len(ref) == min(300, test_rows) and ref.embeddings.shape[1] == 256
    client = _client(repo)
    version = client.get_model_version(MODEL_NAME, "1")  # champion or not, it has its reference
    assert version.tags[REFERENCE_TAG] == f"runs:/{version.run_id}/reference/reference.npz"
    # The tiny model may miss the gate (max_ece on a busy machine); this test is about drift.
    if CHAMPION not in version.aliases:
        client.set_registered_model_alias(MODEL_NAME, CHAMPION, "1")
    images = sorted((repo / C.PATHS.raw).rglob("*.jpg"))
    r = _run(repo, "genderclf", "drift", str(images[0].parent), check=False)
    assert r.returncode == 1, r.stdout + r.stderr[-3000:]
    assert f"the reference holds {len(ref)} images, fewer than drift.min_images=30" in r.stderr
    assert _run(repo, "git", "status", "--porcelain").stdout == ""  # reports/ stays ignored


def test_changing_a_train_param_reruns_exactly_train_evaluate_register(pipeline, pipeline_params):
    repo, _, _ = pipeline
    before = json.loads((repo / C.PATHS.run).read_text())["run_id"]
    params = copy.deepcopy(pipeline_params)
    params["train"]["lr_head"] = pipeline_params["train"]["lr_head"] * 2
    _write_params(repo, params)
    status = _dvc(repo, "status").stdout
    assert "train:" in status and "params.yaml" in status
    # evaluate follows through train's outputs; register also reads the train params (the
    # model card states them, and it re-scores the champion at train.batch_size)
    for stage in set(STAGES) - {"train", "register"} - ALWAYS:
        assert f"{stage}:" not in status

    again = _dvc(repo, "repro")
    assert _ran(again.stdout) == MODEL_STAGES | ALWAYS
    assert _skipped(again.stdout) == set(STAGES) - MODEL_STAGES - ALWAYS
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert (
        lock["stages"]["train"]["params"]["params.yaml"]["train"]["lr_head"]
        == params["train"]["lr_head"]
    )
    assert json.loads((repo / C.PATHS.run).read_text())["run_id"] != before
    report = json.loads((repo / C.PATHS.register_report).read_text())
    assert (report["version"], report["newly_registered"]) == ("2", True)
    assert report["champion_before"]["version"] == "1"
    assert _ran(_dvc(repo, "repro").stdout) == ALWAYS  # and then nothing is left to do
    _commit(repo, "lr_head x2")


def test_dvc_exp_run_with_a_train_param_reruns_train_evaluate_register(pipeline):
    repo, _, _ = pipeline
    before = json.loads((repo / C.PATHS.run).read_text())["run_id"]
    run = _dvc(repo, "exp", "run", "-n", "lr-head-0.0005", "-S", "train.lr_head=0.0005")
    assert _ran(run.stdout) == MODEL_STAGES | ALWAYS
    assert _skipped(run.stdout) == set(STAGES) - MODEL_STAGES - ALWAYS
    # the experiment's results are in the workspace: a new MLflow run, a new version
    assert json.loads((repo / C.PATHS.run).read_text())["run_id"] != before
    report = json.loads((repo / C.PATHS.register_report).read_text())
    assert report["newly_registered"] is True and report["version"] not in ("1", "2")
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["train"]["lr_head"] == 0.0005

    shown = json.loads(_dvc(repo, "exp", "show", "--json").stdout)
    exps = [e for base in shown for e in (base.get("experiments") or [])]
    ours = next(e for e in exps if e.get("name") == "lr-head-0.0005")
    data = ours["revs"][0]["data"]
    eval_metrics = data["metrics"]["metrics/eval.json"]["data"]
    ev = json.loads((repo / C.PATHS.eval_metrics).read_text())
    for key in ("accuracy", "precision", "recall", "f1", "roc_auc"):
        assert eval_metrics[key] == pytest.approx(ev[key]), key
    assert data["params"]["params.yaml"]["data"]["train"]["lr_head"] == 0.0005
    table = _dvc(repo, "exp", "show", "--no-pager", "--md").stdout
    assert "lr-head-0.0005" in table and "accuracy" in table and "roc_auc" in table


# --- bad input through the CLI ---------------------------------------------------------------


def _train_cli(
    repo: Path, params: dict[str, Any], cwd: Path, env_extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    bad = cwd.parent / f"{cwd.name}-params.yaml"
    bad.write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**_env(repo), **(env_extra or {})}
    proc = _run(
        repo, str(BIN / "genderclf"), "train", "--params", str(bad), check=False, env=env, cwd=cwd
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc


def test_cli_unknown_backbone_names_the_param(pipeline, pipeline_params):
    repo, _, _ = pipeline
    params = copy.deepcopy(pipeline_params)
    params["train"]["backbone"] = "alexnet"
    proc = _train_cli(repo, params, repo)
    assert "train.backbone: allowed values are" in proc.stderr
    assert "'simple_cnn'" in proc.stderr


def test_cli_image_size_the_backbone_cannot_take_names_the_param(pipeline, pipeline_params):
    repo, _, _ = pipeline
    params = copy.deepcopy(pipeline_params)
    params["base"]["image_size"] = 16
    params["train"]["backbone"] = "vgg16"
    model_before = (repo / C.PATHS.model).read_bytes()
    proc = _train_cli(repo, params, repo)
    assert "error (train): base.image_size=16 is too small for train.backbone=vgg16" in proc.stderr
    assert (repo / C.PATHS.model).read_bytes() == model_before


def test_cli_train_without_prepared_data_names_the_stage_to_run(
    pipeline, pipeline_params, tmp_path
):
    repo, _, _ = pipeline
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    proc = _train_cli(repo, pipeline_params, empty)
    assert "error (train): data/prepared/meta.json not found" in proc.stderr
    assert "run `dvc repro augment`" in proc.stderr
