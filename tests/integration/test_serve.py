"""The registered champion served by MLflow's own server answers like `genderclf predict`.

For real: a Keras model is logged to a run in a SQLite store, the register stage packages
it as the pyfunc serving model and makes it champion, `mlflow models serve` runs it on
loopback, and real JPEG/PNG bytes are posted base64-encoded. The answers must equal those
of the `genderclf predict --no-detect` command on the same files, and with
`params: {"detect": true}` those of `genderclf predict` (with face detection) on whole
photos: 640x480 scenes with a sample face pasted at a realistic size, which BlazeFace
finds, a photo with three faces, and one with none.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests.helpers import BIN, load_pyfunc
from tests.helpers.servers import free_port, http_json, wait_http

from genderclf import config as C
from genderclf.data.sample import render

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def champion(mlflow_store, model_settings, prepared, sample_data, tmp_path) -> list[Path]:
    """Register a model as champion; returns the image files to classify."""
    import keras
    from tests.helpers.stages import log_model_run, write_evaluation
    from tests.helpers.stages import register as run_register

    from genderclf.contracts import ModelInput
    from genderclf.inference import Classifier, ServingConfig, open_rgb
    from genderclf.model.backbones import build_model
    from genderclf.model.scoring import predict_split

    # an untrained model: no floor, no calibration ceiling; the serving check stays on
    settings = model_settings(
        {"register.min_accuracy": 0.0, "register.max_ece": 1.0, "register.serving_check_images": 8}
    )
    size = settings.base.image_size
    raw, _ = sample_data
    files = sorted((raw / "img_align_celeba" / "img_align_celeba").glob("*.jpg"))[:10]
    # Other formats the server must take as bytes too: a grayscale PNG of a face.
    Image.open(files[0]).convert("L").save(tmp_path / "gray.png")
    files.append(tmp_path / "gray.png")

    keras.utils.set_random_seed(11)
    model = build_model(settings.train, size)
    # Threshold at the median score of these images, so both labels occur in the answers.
    clf = Classifier(model, ServingConfig.of(ModelInput(size, "center_crop")))
    p = clf.p_male([clf.fit(open_rgb(f, 10**8)) for f in files])
    threshold = float(np.median(p))
    log_model_run(model, settings, Path("models"))
    # the evaluate stage's record: this model's own answers on the test split
    names, y, p_test = predict_split(model, prepared, "test", 64)
    write_evaluation(
        Path("metrics"),
        names,
        y,
        threshold=threshold,
        pred=(p_test >= threshold).astype(int),
        prob=p_test,
    )
    report = run_register(
        settings,
        Path("models/run.json"),
        Path("metrics/eval.json"),
        prepared,
        C.PATHS.register_report,
        sample_data[1],
    )
    assert report["decision"] == "promoted" and report["model_uri"].startswith("models:/m-")
    return files


def _scene(rng: np.random.Generator, w: int = 640, h: int = 480) -> Image.Image:
    """A room-like background: smooth shading and a little sensor noise."""
    low = Image.fromarray(rng.integers(40, 200, size=(6, 8, 3), dtype=np.uint8))
    wall = np.asarray(low.resize((w, h), Image.BICUBIC), dtype=np.int16)
    wall = wall + rng.integers(-4, 5, size=wall.shape)
    return Image.fromarray(np.clip(wall, 0, 255).astype(np.uint8))


@pytest.fixture
def photos(tiny_settings, tmp_path) -> list[Path]:
    """Whole photos: five 640x480 scenes with one face each (faces the detector finds
    there), one 386x466 photo with three, and an empty scene."""
    from genderclf.faces import make_detector

    detector = make_detector(tiny_settings.predict)
    rng = np.random.default_rng(5)
    folder = tmp_path / "photos"
    folder.mkdir()
    out: list[Path] = []
    for i in range(60):
        face = render(3, i, i, 0.5, 0.0)[0]
        scene = _scene(rng)
        scene.paste(face, (int(rng.integers(20, 440)), int(rng.integers(10, 250))))
        if len(detector.detect(np.asarray(scene))) == 1:
            out.append(folder / f"scene{len(out)}.jpg")
            scene.save(out[-1], quality=92)
        if len(out) == 5:
            break
    assert len(out) == 5, "BlazeFace found fewer than 5 of 60 pasted sample faces"
    group = _scene(rng, 386, 466)
    for j, at in enumerate([(10, 10), (104, 238), (198, 10)]):
        group.paste(render(3, 100 + j, 100 + j, 0.5, 0.0)[0], at)
    group.save(folder / "group.png")
    _scene(rng).save(folder / "empty.jpg", quality=92)
    return [*out, folder / "group.png", folder / "empty.jpg"]


def _predict(files: list[Path], env: dict[str, str], out: Path, *flags: str) -> list[dict]:
    """What the command says, in its own process."""
    cmd = [
        str(BIN / "genderclf"),
        "predict",
        *map(str, files),
        *flags,
        "--format",
        "json",
        "--output",
        str(out),
        "--quiet",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_served_champion_answers_like_predict(champion, photos, mlflow_store, tmp_path):
    files = champion
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store}
    # `mlflow models serve` execs `uvicorn` from PATH: this environment's, however pytest ran
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    expected = _predict(files, env, tmp_path / "pred.json", "--no-detect")
    assert len(expected) == len(files)
    assert {r["label"] for r in expected} == {"male", "female"}
    # With detection, on whole photos (no params.yaml here: the registered settings apply).
    per_face = _predict(photos, env, tmp_path / "faces.json")
    assert [r["status"] for r in per_face].count("ok") >= 7, per_face
    assert sum(r["file"].endswith("group.png") for r in per_face) == 3
    assert per_face[-1]["status"] == "no_face"

    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "models",
                "serve",
                "-m",
                "models:/gender-classifier@champion",
                "--env-manager",
                "local",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", 180, proc, log)
        images = [base64.b64encode(f.read_bytes()).decode() for f in files]
        images.append(base64.b64encode(b"\xff\xd8\xff\xe0 not really a jpeg").decode())
        answer = http_json(
            f"http://127.0.0.1:{port}/invocations",
            {"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}},
        )
        sent = [base64.b64encode(f.read_bytes()).decode() for f in photos]
        detected = http_json(
            f"http://127.0.0.1:{port}/invocations",
            {
                "dataframe_split": {"columns": ["image"], "data": [[i] for i in sent]},
                "params": {"detect": True},
            },
        )
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
    # The server's log: TensorFlow started quietly by the served model's code.
    noise = re.findall(r".*(?:\b[IEW]0000 |cuInit|absl::InitializeLog|oneDNN).*", log.read_text())
    assert noise == [], noise
    got = answer["predictions"]
    assert len(got) == len(files) + 1
    for e, g in zip(expected, got, strict=False):
        assert g["label"] == e["label"], (e["file"], g, e)
        assert g["probability"] == pytest.approx(e["probability"], abs=1e-5)
        assert g["p_male"] == pytest.approx(e["p_male"], abs=1e-5)
        assert g.get("error") is None
    bad = got[-1]
    assert bad["label"] is None and "corrupt or truncated" in bad["error"]
    assert set(bad) == {"label", "probability", "p_male", "error"}  # today's columns
    # One answer per face, with its box, in the order of `genderclf predict`'s rows.
    got = detected["predictions"]
    assert len(got) == len(per_face)
    names = [str(f) for f in photos]
    for e, g in zip(per_face, got, strict=True):
        assert g["image"] == names.index(e["file"]), (e, g)
        for key in ("face", "x", "y", "w", "h", "label", "status", "error"):
            assert g[key] == e[key], (key, e, g)
        if e["status"] == "ok":
            assert g["probability"] == pytest.approx(e["probability"], abs=1e-5)
            assert g["p_male"] == pytest.approx(e["p_male"], abs=1e-5)
        else:  # JSON null, not NaN
            assert g["probability"] is None and g["p_male"] is None and g["x"] is None


def test_registered_model_carries_the_evaluated_threshold(
    champion, mlflow_store, tmp_path, monkeypatch
):
    import tempfile

    from genderclf.tracking.serving import load_classifier

    # the cut on the raw output (eval.json names both scales: issue 21)
    evaluated = json.loads(Path("metrics/eval.json").read_text())["threshold_raw"]
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    with monkeypatch.context() as m:
        m.setattr(tempfile, "tempdir", str(scratch))
        clf = load_classifier("models:/gender-classifier@champion")
    assert clf.config.threshold == pytest.approx(evaluated)
    assert list(scratch.iterdir()) == []  # the downloaded copy is gone once loaded
    # The pyfunc loads in-process too, and takes raw bytes.
    model = load_pyfunc("models:/gender-classifier@champion", scratch)
    import pandas as pd

    frame = pd.DataFrame({"image": [champion[0].read_bytes()]})
    out = model.predict(frame)
    assert list(out.columns) == ["label", "probability", "p_male", "error"]
    assert out["label"].iloc[0] in ("male", "female")
    # The same request with detection: one row per face found, each with its box.
    faces = model.predict(frame, params={"detect": True})
    assert list(faces.columns) == [
        "image",
        "face",
        "x",
        "y",
        "w",
        "h",
        "label",
        "probability",
        "p_male",
        "status",
        "error",
    ]
    assert faces["image"].tolist() == [0] * len(faces)
    assert set(faces["status"]) <= {"ok", "no_face"}
