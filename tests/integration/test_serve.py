"""The registered champion served by MLflow's own server answers like `genderclf predict`.

For real: a Keras model is logged to a run in a SQLite store, the register stage packages
it as the pyfunc serving model and makes it champion, `mlflow models serve` runs it on
loopback, and real JPEG/PNG bytes are posted base64-encoded. The answers must equal those
of the `genderclf predict --no-detect` command on the same files.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests.helpers import BIN
from tests.helpers.servers import free_port, http_json, wait_http

from genderclf import config as C

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def champion(mlflow_store, model_settings, prepared, sample_data, tmp_path) -> list[Path]:
    """Register a model as champion; returns the image files to classify."""
    import keras
    from tests.helpers.stages import log_model_run
    from tests.helpers.stages import register as run_register

    from genderclf.inference import Classifier, ServingConfig, open_rgb
    from genderclf.io import write_json
    from genderclf.model.backbones import build_model

    settings = model_settings({"register.min_accuracy": 0.5})
    size = settings.base.image_size
    raw, _ = sample_data
    files = sorted((raw / "img_align_celeba" / "img_align_celeba").glob("*.jpg"))[:10]
    # Other formats the server must take as bytes too: a grayscale PNG of a face.
    Image.open(files[0]).convert("L").save(tmp_path / "gray.png")
    files.append(tmp_path / "gray.png")

    keras.utils.set_random_seed(11)
    model = build_model(settings.train, size)
    # Threshold at the median score of these images, so both labels occur in the answers.
    clf = Classifier(model, ServingConfig(size, "center_crop", 0.5))
    p = clf.p_male([clf.fit(open_rgb(f, 10**8)) for f in files])
    threshold = float(np.median(p))
    run = log_model_run(model, size)
    write_json(Path("models/run.json"), {**run, "image_size": size, "resize": "center_crop"})
    write_json(Path("metrics/eval.json"), {"accuracy": 0.95, "threshold": threshold,
                                           "f1": 0.9, "roc_auc": 0.97})  # fmt: skip
    report = run_register(settings, Path("models/run.json"), Path("metrics/eval.json"),
                          prepared, C.PATHS.register_report)  # fmt: skip
    assert report["decision"] == "promoted" and report["model_uri"].startswith("models:/m-")
    return files


def test_served_champion_answers_like_predict_no_detect(champion, mlflow_store, tmp_path):
    files = champion
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store}
    # What the command says, in its own process.
    out = tmp_path / "pred.json"
    cmd = [str(BIN / "genderclf"), "predict", *map(str, files), "--no-detect",
           "--format", "json", "--output", str(out), "--quiet"]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = json.loads(out.read_text())
    assert len(expected) == len(files)
    assert {r["label"] for r in expected} == {"male", "female"}

    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "models", "serve", "-m", "models:/gender-classifier@champion",
             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", 180, proc, log)
        images = [base64.b64encode(f.read_bytes()).decode() for f in files]
        images.append(base64.b64encode(b"\xff\xd8\xff\xe0 not really a jpeg").decode())
        answer = http_json(
            f"http://127.0.0.1:{port}/invocations",
            {"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}},
        )
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
    got = answer["predictions"]
    assert len(got) == len(files) + 1
    for e, g in zip(expected, got, strict=False):
        assert g["label"] == e["label"], (e["file"], g, e)
        assert g["probability"] == pytest.approx(e["probability"], abs=1e-5)
        assert g["p_male"] == pytest.approx(e["p_male"], abs=1e-5)
        assert g.get("error") is None
    bad = got[-1]
    assert bad["label"] is None and "corrupt or truncated" in bad["error"]


def test_registered_model_carries_the_evaluated_threshold(champion, mlflow_store):
    import mlflow

    from genderclf.tracking.serving import load_classifier

    evaluated = json.loads(Path("metrics/eval.json").read_text())["threshold"]
    clf = load_classifier("models:/gender-classifier@champion")
    assert clf.config.threshold == pytest.approx(evaluated)
    # The pyfunc loads in-process too, and takes raw bytes.
    model = mlflow.pyfunc.load_model("models:/gender-classifier@champion")
    import pandas as pd

    frame = pd.DataFrame({"image": [champion[0].read_bytes()]})
    out = model.predict(frame)
    assert list(out.columns) == ["label", "probability", "p_male", "error"]
    assert out["label"].iloc[0] in ("male", "female")
