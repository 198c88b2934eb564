"""`genderclf drift` on the bundled sample, against a real champion in a real MLflow store.

A small CNN goes through the real evaluate stage (which writes the reference statistics)
and the real register stage (which logs them with the version); the command then loads
the champion and its reference from the registry, as a user's would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from tests.helpers import params as P
from tests.helpers.stages import copy_images, register_champion
from typer.testing import CliRunner

from genderclf import config as C
from genderclf.cli import app
from genderclf.data.split import read_split
from genderclf.monitor.drift import DRIFT_EXIT_CODE
from genderclf.tracking.monitor import undo_drift_checks
from genderclf.tracking.registry import REFERENCE_TAG
from genderclf.tracking.setup import EXPERIMENT, MODEL_NAME, MONITOR_EXPERIMENT


@pytest.fixture
def champion(mlflow_store, real_params, sample_data, prepared) -> Path:
    """A registered champion with its reference; returns the params.yaml the CLI reads."""
    raw, splits = sample_data
    return register_champion(P.shrink(real_params, P.DRIFT_CHAMPION), raw, splits, prepared)


def _drift(*args: str):
    return CliRunner().invoke(app, ["drift", *args], catch_exceptions=False)


@pytest.mark.integration
def test_drift_command_same_vs_shifted_batch(champion, sample_data):
    from mlflow import MlflowClient

    raw, splits = sample_data
    train = read_split(splits, "train")["path"].tolist()[:80]
    same = copy_images(train, raw, Path("batches/same"))
    dark = copy_images(train, raw, Path("batches/dark"), darken=0.45)
    (dark / "broken.jpg").write_text("this is not a JPEG")
    (dark / "notes.txt").write_text("left out: not an image name")

    r = _drift(str(same), "--params", str(champion))
    assert r.exit_code == 0, r.output
    assert "No drift: 80 images of batches/same against the reference of version 1" in r.output
    result = json.loads((C.PATHS.drift / "drift.json").read_text())
    assert result["drifted"] is False and result["exit_code"] == 0
    assert result["champion"]["version"] == "1" and result["batch"]["failed"] == []
    assert result["reference"]["images"] == len(read_split(splits, "test"))

    r = _drift(str(dark), "--params", str(champion))
    assert r.exit_code == DRIFT_EXIT_CODE, r.output
    assert "DRIFT in" in r.output and "brightness median" in r.output
    result = json.loads((C.PATHS.drift / "drift.json").read_text())
    views = result["views"]
    assert result["drifted"] and views["image"]["drifted"] and views["embeddings"]["drifted"]
    moved = {f["name"] for f in views["image"]["features"] if f["drifted"]}
    assert {"brightness", "contrast"} <= moved and "width" not in moved
    assert result["batch"]["images"] == 80 and result["batch"]["non_images"] == 1
    assert [f["file"] for f in result["batch"]["failed"]] == ["broken.jpg"]
    assert "text_file" in result["batch"]["failed"][0]["reason"]
    summary = (C.PATHS.drift / "summary.md").read_text()
    assert "broken.jpg" in summary and "| brightness |" in summary
    png = Image.open(C.PATHS.drift / "drift.png")
    assert png.size[0] > 1000
    assert sorted(p.name for p in C.PATHS.drift.iterdir()) == [
        "drift.json",
        "drift.png",
        "summary.md",
    ]

    client = MlflowClient()
    mv = client.get_model_version(MODEL_NAME, "1")
    assert mv.tags[REFERENCE_TAG] == f"runs:/{mv.run_id}/reference/reference.npz"
    assert json.loads(mv.tags["drift.last"])["drifted"] is True
    # The checks' runs: in an experiment of their own, apart from the training runs,
    # which MLflow opens in the model-training view.
    monitoring = client.get_experiment_by_name(MONITOR_EXPERIMENT)
    assert monitoring.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs(
        [monitoring.experiment_id],
        "tags.`genderclf.kind` = 'drift'",
        order_by=["start_time ASC"],
    )
    assert [r.data.tags["drift.detected"] for r in runs] == ["false", "true"]
    assert all(r.data.tags["champion.version"] == "1" for r in runs)
    assert runs[1].data.metrics["drift/detected"] == 1.0
    arts = {a.path for a in client.list_artifacts(runs[1].info.run_id, "drift")}
    assert arts == {"drift/drift.json", "drift/summary.md", "drift/drift.png"}
    training = client.get_experiment_by_name(EXPERIMENT)
    assert not client.search_runs([training.experiment_id], "tags.`genderclf.kind` = 'drift'")

    # Undoing a watch that fed itself (docs/monitoring.md): the checks of a location go,
    # and drift.last falls back to the newest check left, then away.
    undone = undo_drift_checks("batches/dark")
    assert undone["deleted"] == [runs[1].info.run_id]
    last = json.loads(client.get_model_version(MODEL_NAME, "1").tags["drift.last"])
    assert last == {
        "run_id": runs[0].info.run_id,
        "at": runs[0].info.run_name.removeprefix("drift-"),
        "drifted": False,
        "location": "batches/same",
    }
    assert undo_drift_checks("batches")["deleted"] == [runs[0].info.run_id]
    assert "drift.last" not in client.get_model_version(MODEL_NAME, "1").tags
    assert client.get_run(runs[0].info.run_id).info.lifecycle_stage == "deleted"


@pytest.mark.integration
def test_drift_command_on_an_s3_prefix(champion, sample_data, monkeypatch, tmp_path):
    """The same check on a prefix of a real S3-protocol server, found as a user's would be
    (AWS_ENDPOINT_URL and the credentials from the environment); an unreadable object is
    listed, not fatal, and the credentials appear in no output."""
    from tests.helpers.servers import S3_SECRET, s3_client, s3_env, s3_server

    raw, splits = sample_data
    train = read_split(splits, "train")["path"].tolist()[:80]
    dark = copy_images(train, raw, tmp_path / "dark", darken=0.45)
    with s3_server("incoming") as endpoint:
        client = s3_client(endpoint)
        for f in sorted(dark.iterdir()):
            client.upload_file(str(f), "incoming", f"cam-7/2026-12-02/{f.name}")
        client.put_object(Bucket="incoming", Key="cam-7/2026-12-02/broken.jpg", Body=b"no")
        client.put_object(Bucket="incoming", Key="cam-7/2026-12-02/_SUCCESS", Body=b"")
        client.put_object(Bucket="incoming", Key="cam-8/other.jpg", Body=b"not this prefix")
        for key, value in {**s3_env(), "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
        r = _drift("s3://incoming/cam-7/2026-12-02/", "--params", str(champion))
    assert r.exit_code == DRIFT_EXIT_CODE, r.output
    assert "80 images of s3://incoming/cam-7/2026-12-02/" in r.output
    result = json.loads((C.PATHS.drift / "drift.json").read_text())
    assert result["drifted"] and result["views"]["image"]["drifted"]
    batch = result["batch"]
    assert batch["location"] == "s3://incoming/cam-7/2026-12-02/"
    assert batch["images"] == 80 and batch["non_images"] == 1  # _SUCCESS
    assert [f["file"] for f in batch["failed"]] == ["broken.jpg"]
    written = "".join(f.read_text() for f in C.PATHS.drift.glob("*.[jm][sd]*"))
    assert S3_SECRET not in r.output + written


@pytest.mark.integration
def test_drift_command_too_few_images_is_a_clear_error(champion, sample_data):
    empty = Path("batches/empty")
    empty.mkdir(parents=True)
    r = _drift(str(empty), "--params", str(champion))
    assert r.exit_code == 1
    assert "batches/empty: 0 image files" in r.output and "drift.min_images=30" in r.output
    r = _drift("batches/nowhere", "--params", str(champion))
    assert r.exit_code == 1 and "no such folder" in r.output
    assert not C.PATHS.drift.exists()  # nothing half-written


@pytest.mark.integration
def test_drift_command_without_a_champion_or_its_reference(mlflow_store, real_params, make_image):
    import yaml
    from mlflow import MlflowClient

    Path("params.yaml").write_text(yaml.safe_dump(P.shrink(real_params, P.DRIFT_CHAMPION)))
    for i in range(3):
        make_image(Path("batch") / f"{i}.jpg")
    # no store at all: one line, and no empty mlflow.db made just to look
    r = _drift("batch")
    assert r.exit_code == 1 and "no MLflow tracking store at" in r.output, r.output
    assert "make demo" in r.output and not Path("mlflow.db").exists()
    # a store without a champion
    from genderclf.tracking.setup import configure

    configure()
    r = _drift("batch")
    assert r.exit_code == 1 and "has no gender-classifier@champion" in r.output
    assert "make demo" in r.output
    # a champion registered before drift monitoring: no reference tag on the version
    from tests.helpers.stages import log_model_run

    from genderclf.model.backbones import build_model

    settings = C.load_settings("params.yaml")
    run = log_model_run(build_model(settings.train, settings.base.image_size), settings, Path())
    client = MlflowClient()
    client.create_registered_model(MODEL_NAME)
    mv = client.create_model_version(MODEL_NAME, run["keras_model_uri"], run["run_id"])
    client.set_registered_model_alias(MODEL_NAME, "champion", mv.version)
    r = _drift("batch")
    assert r.exit_code == 1 and "version 1 has no reference statistics" in r.output
    assert "dvc repro evaluate register" in r.output and "--reference" in r.output
