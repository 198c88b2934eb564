"""The `gender-pipeline` Prefect flow against a real temporary Prefect API.

`prefect_test_harness` starts a real (temporary, SQLite-backed) Prefect server; the flow
runs every stage through the real `dvc` in a temporary git repository.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness
from tests.helpers import BIN
from tests.helpers.workspace import copy_pipeline, git_init

from genderclf import config as C

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STAGES = ["download", "validate", "split", "augment", "tune", "train", "evaluate", "register"]


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_params) -> Path:
    """A git repo with the pipeline (tiny params) and a dvc wrapper that fails once."""
    root = tmp_path_factory.mktemp("flow")
    repo = root / "repo"
    copy_pipeline(repo)
    params = yaml.safe_load(yaml.safe_dump(tiny_params))
    params["train"].update(backbone="simple_cnn", epochs_head=1, epochs_finetune=1)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git_init(repo)
    # A transient fault at the process boundary: the first `dvc repro` of download fails
    # the way a dropped connection does; every later call is the real dvc.
    marker = root / "download-failed-once"
    wrapper = root / "dvc-flaky"
    wrapper.write_text(
        "#!/usr/bin/env bash\n"
        f'if [[ "$*" == *"--single-item download"* && ! -e "{marker}" ]]; then\n'
        f'  touch "{marker}"; echo "ConnectionResetError: injected transient failure" >&2; exit 1\n'
        "fi\n"
        f'exec "{BIN / "dvc"}" "$@"\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    return repo


@pytest.fixture
def flow_env(workspace, monkeypatch):
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", str(workspace / "src"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'mlflow.db'}")
    monkeypatch.setenv("GENDERCLF_DVC", str(workspace.parent / "dvc-flaky"))
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    monkeypatch.setattr("flows.pipeline.RETRY_DELAY_S", 0.5)
    return workspace


def _artifact(key: str):
    """The newest artifact with `key`, read back from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    return found[0].model_dump(mode="json") if found else None


def test_flow_runs_every_stage_retries_download_and_publishes(harness, flow_env):
    from flows.pipeline import gender_pipeline
    from mlflow import MlflowClient

    repo = flow_env
    result = gender_pipeline(repo=str(repo))
    # every stage ran, in DVC's order, download after one injected failure
    assert [result[s] for s in STAGES] == ["ran"] * len(STAGES)
    assert (repo.parent / "download-failed-once").exists()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    assert (
        "didn't change"
        not in subprocess.run(
            [str(BIN / "dvc"), "status"], cwd=repo, capture_output=True, text=True
        ).stdout
    )

    # one MLflow run per flow run, adopted by the stages
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.tags["prefect.flow_run_id"]
    assert run.data.params["train.backbone"] == "simple_cnn"  # logged by the train stage
    assert "test/accuracy" in run.data.metrics  # logged by the evaluate stage
    assert json.loads((repo / C.PATHS.run).read_text())["run_id"] == result["mlflow_run_id"]

    # Prefect artifacts
    table = _artifact("evaluation-metrics")
    assert table is not None and table["type"] == "table" and "accuracy" in str(table["data"])
    decision = _artifact("promotion-decision")
    assert decision is not None and "Promotion: version" in decision["data"]
    validation = _artifact("validation-summary")
    assert validation is not None and "usable" in validation["data"]
    link = _artifact("mlflow-run")
    assert link is not None and result["mlflow_run_id"] in link["data"]


def test_rerun_skips_every_stage(harness, flow_env):
    from flows.pipeline import gender_pipeline

    lock_before = (flow_env / "dvc.lock").read_text()
    result = gender_pipeline(repo=str(flow_env))
    # download always runs: it lists the source, finds it unchanged, keeps data/raw and
    # counts as skipped; nothing after it starts a DVC process
    assert [result[s] for s in STAGES] == ["skipped"] * len(STAGES)
    assert "mlflow_run_id" not in result
    assert (flow_env / "dvc.lock").read_text() == lock_before


def test_invalid_override_fails_before_any_stage(harness, flow_env):
    from flows.pipeline import gender_pipeline

    params_before = (flow_env / "params.yaml").read_text()
    lock_before = (flow_env / "dvc.lock").read_text()
    with pytest.raises(C.SettingsError, match=r"train\.backbone"):
        gender_pipeline(repo=str(flow_env), overrides={"train.backbone": "alexnet"})
    with pytest.raises(C.SettingsError, match=r"train\.lr_headd"):
        gender_pipeline(repo=str(flow_env), overrides={"train.lr_headd": 0.1})
    assert (flow_env / "params.yaml").read_text() == params_before
    assert (flow_env / "dvc.lock").read_text() == lock_before


def test_valid_override_is_written_back_and_reruns_training_only(harness, flow_env):
    from flows.pipeline import gender_pipeline

    result = gender_pipeline(repo=str(flow_env), overrides={"train.lr_head": 0.002})
    assert yaml.safe_load((flow_env / "params.yaml").read_text())["train"]["lr_head"] == 0.002
    ran = [s for s in STAGES if result[s] == "ran"]
    assert ran == ["tune", "train", "evaluate", "register"]  # download: the source unchanged
    lock = yaml.safe_load((flow_env / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["train"]["lr_head"] == 0.002


def test_second_run_on_a_busy_workspace_fails_clearly(harness, flow_env):
    from flows.pipeline import WorkspaceBusy, gender_pipeline, workspace_lock

    lock_before = (flow_env / "dvc.lock").read_text()
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with workspace_lock(flow_env, timeout_s=5):
            held.set()
            release.wait(60)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(10)
        with pytest.raises(WorkspaceBusy, match="in use"):
            gender_pipeline(repo=str(flow_env), lock_timeout=2)
    finally:
        release.set()
        t.join()
    assert (flow_env / "dvc.lock").read_text() == lock_before


def _wait_for_state(flow_name: str, state: str, timeout: float = 900):
    """The newest run of `flow_name` once it is in `state` (through the Prefect API)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState
    from prefect.client.schemas.filters import FlowRunFilterStateType as Type
    from prefect.client.schemas.sorting import FlowRunSort

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=Type(any_=[state]))),
                sort=FlowRunSort.START_TIME_DESC,
                limit=1,
            )
            if runs:
                return runs[0]
            time.sleep(2)
    raise TimeoutError(f"no flow run reached {state} in {timeout}s")


@pytest.mark.parametrize("approve", [True, False])
def test_manual_approval_pauses_for_a_person_who_approves_or_rejects(harness, flow_env, approve):
    """`register.approval: manual`: the candidate passes the gate, waits as challenger, the
    flow run pauses with its model card, and the answer given through Prefect's API (as
    the UI's Resume form sends it) promotes it or records the no."""
    from flows.pipeline import gender_pipeline
    from mlflow import MlflowClient
    from prefect.flow_runs import resume_flow_run

    from genderclf.tracking.setup import CHAMPION, MODEL_NAME

    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    with contextlib.suppress(Exception):  # judge the new candidate as the first one
        client.delete_registered_model_alias(MODEL_NAME, CHAMPION)
    overrides = {
        "register.approval": "manual",
        "register.min_accuracy": 0.0,
        "register.max_ece": 1.0,
        "train.lr_head": 0.0013 if approve else 0.0011,
    }
    result: dict = {}
    flow = threading.Thread(
        target=lambda: result.update(
            gender_pipeline(repo=str(flow_env), overrides=overrides, approval_timeout=900)
        )
    )
    flow.start()
    paused = _wait_for_state("gender-pipeline", "PAUSED")
    answer = {"approve": False, "reason": "the test failed before answering", "reviewer": "test"}
    try:
        report = json.loads((flow_env / C.PATHS.register_report).read_text())
        assert report["decision"] == "pending_approval"
        version = str(report["version"])
        assert str(client.get_model_version_by_alias(MODEL_NAME, "challenger").version) == version
        reason = "card reviewed" if approve else "the Young slice is too thin to judge"
        answer = {"approve": approve, "reason": reason, "reviewer": "ana"}
    finally:  # always answer, so a failed assertion does not leave the flow paused for 900 s
        resume_flow_run(paused.id, run_input=answer)
        flow.join(300)
    assert not flow.is_alive(), "the flow did not finish after it was resumed"
    assert result["approval"] == {
        "version": version,
        "approved": approve,
        "reviewer": "ana",
        "reason": reason,
        "moved": approve,
    }
    mv = client.get_model_version(MODEL_NAME, version)
    record = json.loads(mv.tags["approval"])
    assert (record["verdict"], record["by"]) == ("approved" if approve else "rejected", "ana")
    assert "by ana" in mv.description and reason in mv.description
    champion = None
    with contextlib.suppress(Exception):
        champion = str(client.get_model_version_by_alias(MODEL_NAME, CHAMPION).version)
    assert (champion == version) is approve
    if approve:
        move = json.loads(mv.tags[f"alias.{CHAMPION}.set"])
        assert "by ana: card reviewed" in move["reason"]
    assert _artifact("approval") is not None and _artifact("model-card") is not None
