"""`genderclf predict`: face detection, cropping, bad input, and the command's exit status.

Faces come from the sample generator (drawn faces OpenCV's Haar cascade finds about half
of the time): the tests pick ones the detector finds on their own, paste them into bigger
photos at known places, and check where the boxes land. The model is an untrained small
CNN saved to a `.keras` file (the mechanics, not the accuracy, are under test).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from genderclf import inference as P
from genderclf.cli import app
from genderclf.config import PredictSettings
from genderclf.data.sample import render
from genderclf.tracking.serving import load_classifier

SIZE = 32


def _face(i: int) -> Image.Image:
    out = render(7, i, i // 4, 0.5, 0.0)
    return out[0] if isinstance(out, tuple) else out


@pytest.fixture(scope="module")
def predict_settings(tiny_settings) -> PredictSettings:
    """The `predict` section of the real params.yaml."""
    return tiny_settings.predict


def _with(s: PredictSettings, **changes) -> PredictSettings:
    return s.model_copy(update=changes)


@pytest.fixture(scope="module")
def detector(predict_settings) -> P.FaceDetector:
    return P.FaceDetector.from_settings(predict_settings)


@pytest.fixture(scope="module")
def faces(detector) -> list[Image.Image]:
    """Sample faces (178x218) the detector finds when each stands alone on a plain canvas."""
    found = []
    for i in range(200):
        face = _face(i)
        contexts = [((60, 60), 300, 340), ((250, 120), 640, 480), ((330, 200), 840, 460)]
        if all(len(detector.detect(np.asarray(_canvas([(face, at)], w, h)))) == 1
               for at, w, h in contexts):  # fmt: skip
            found.append(face)
        if len(found) == 3:
            return found
    pytest.fail("the Haar cascade found fewer than 3 of 200 sample faces")


def _canvas(items: list[tuple[Image.Image, tuple[int, int]]], w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(0)
    base = rng.integers(90, 110, size=(h, w, 3), dtype=np.uint8)  # a dull, textured wall
    im = Image.fromarray(base)
    for face, at in items:
        im.paste(face, at)
    return im


def _inside(box: P.Box, at: tuple[int, int]) -> bool:
    """The box's centre lies on the pasted 178x218 face and the box is face-sized."""
    cx, cy = box.x + box.w / 2, box.y + box.h / 2
    return at[0] < cx < at[0] + 178 and at[1] < cy < at[1] + 218 and 60 < box.w < 178


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, make_settings) -> Path:
    import keras

    from genderclf.model.backbones import build_model

    keras.utils.set_random_seed(3)
    model = build_model(make_settings({"train.backbone": "simple_cnn"}).train, SIZE)
    path = tmp_path_factory.mktemp("model") / "model.keras"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def clf(model_file) -> P.Classifier:
    return P.load_local(model_file, P.ServingConfig(SIZE, "center_crop", 0.5))


# --- detection and cropping ------------------------------------------------------------------


def test_detects_a_face_where_it_was_placed(detector, faces):
    at = (250, 120)
    boxes = detector.detect(np.asarray(_canvas([(faces[0], at)], 640, 480)))
    assert len(boxes) == 1
    assert _inside(boxes[0], at), boxes


def test_detects_several_faces_left_to_right(detector, faces):
    places = [(30, 40), (330, 200), (630, 60)]
    photo = _canvas(list(zip(faces, places, strict=True)), 840, 460)
    boxes = detector.detect(np.asarray(photo))
    assert len(boxes) == 3
    for box, at in zip(boxes, places, strict=True):
        assert _inside(box, at), (box, at)


def test_big_photo_is_detected_on_a_smaller_copy(faces, predict_settings):
    # 2.5x upscaled photo, detection capped at 1024 px: boxes come back in full-size pixels.
    photo = _canvas([(faces[0], (100, 100))], 400, 400).resize((1000, 1000))
    small = P.FaceDetector.from_settings(_with(predict_settings, detect_max_side=256))
    boxes = small.detect(np.asarray(photo))
    assert len(boxes) == 1
    b = boxes[0]
    assert 250 < b.x + b.w / 2 < 695 and 250 < b.y + b.h / 2 < 795 and b.w > 150


def test_no_face_in_a_plain_or_noisy_image(detector):
    rng = np.random.default_rng(1)
    assert detector.detect(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)) == []
    assert detector.detect(np.full((300, 400, 3), 200, np.uint8)) == []


def test_unknown_cascade_names_the_bundled_ones(predict_settings):
    with pytest.raises(P.PredictError, match=r"predict.cascade.*haarcascade_frontalface_alt"):
        P.FaceDetector.from_settings(_with(predict_settings, cascade="no_such_cascade.xml"))


def test_face_crop_frames_like_the_training_crop_and_pads_at_edges(faces, detector):
    # Training crops: the 178x178 centre square of the 178x218 image. The crop around the
    # detected box should look like that square: compare with a loose pixel tolerance.
    face = faces[0]
    (box,) = detector.detect(np.asarray(_canvas([(face, (60, 60))], 300, 340)))
    photo = _canvas([(face, (60, 60))], 300, 340)
    crop = np.asarray(P.face_crop(photo, box, 64, 1.7, -0.1), dtype=np.float32)
    train = np.asarray(face.crop((0, 20, 178, 198)).resize((64, 64)), dtype=np.float32)
    assert crop.shape == (64, 64, 3)
    assert np.abs(crop - train).mean() < 40  # same framing, not a different part of the head
    # A face at the very corner: the square reaches outside the photo and is edge-padded.
    edge = P.face_crop(photo, P.Box(0, 0, 100, 100), 32, 1.7, -0.1)
    assert edge.size == (32, 32)


# --- reading images ----------------------------------------------------------------------------


def _jpeg_bytes(im: Image.Image, **kw) -> bytes:
    import io

    buf = io.BytesIO()
    im.save(buf, "JPEG", **kw)
    return buf.getvalue()


def test_bad_inputs_each_get_a_reason(tmp_path, faces):
    good = _jpeg_bytes(faces[0])
    (tmp_path / "text.jpg").write_text("not an image at all")
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 2])
    Image.new("RGB", (3000, 2000)).save(tmp_path / "huge.png")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    limit = 5_000_000
    with pytest.raises(P.ImageError, match="not an image"):
        P.open_rgb(tmp_path / "text.jpg", limit)
    with pytest.raises(P.ImageError, match="truncated"):
        P.open_rgb(tmp_path / "truncated.jpg", limit)
    with pytest.raises(P.ImageError, match=r"3000x2000.*predict.max_pixels"):
        P.open_rgb(tmp_path / "huge.png", limit)
    with pytest.raises(P.ImageError, match="cannot read"):
        P.open_rgb(tmp_path / "gone.jpg", limit)


def test_grayscale_cmyk_palette_and_alpha_become_rgb(tmp_path, faces):
    face = faces[0]
    face.convert("L").save(tmp_path / "gray.jpg")
    face.convert("CMYK").save(tmp_path / "cmyk.jpg")
    face.convert("P").save(tmp_path / "palette.png")
    face.convert("RGBA").save(tmp_path / "alpha.png")
    for name in ("gray.jpg", "cmyk.jpg", "palette.png", "alpha.png"):
        im = P.open_rgb(tmp_path / name, 10**7)
        assert im.mode == "RGB" and im.size == face.size, name


def test_exif_rotated_photo_is_turned_upright(tmp_path, faces, detector):
    # A camera held sideways stores the pixels rotated and says so in EXIF (orientation 6:
    # rotate 90 degrees clockwise to view). Without honouring it the face lies on its side.
    photo = _canvas([(faces[0], (60, 60))], 300, 340)
    stored = photo.transpose(Image.Transpose.ROTATE_90)  # what the sensor wrote
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "sideways.jpg", exif=exif.tobytes(), quality=95)
    upright = P.open_rgb(tmp_path / "sideways.jpg", 10**7)
    assert upright.size == (300, 340)
    assert len(detector.detect(np.asarray(upright))) == 1
    assert detector.detect(np.asarray(stored)) == []  # the raw pixels alone: no face


def test_find_images_walks_folders_and_lists_what_it_leaves_out(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/1.jpg", "a/b/2.PNG", "a/notes.txt", "3.webp"):
        (tmp_path / name).write_bytes(b"x")
    images, other = P.find_images([tmp_path / "a", tmp_path / "3.webp"])
    assert [p.name for p in images] == ["1.jpg", "2.PNG", "3.webp"]
    assert [p.name for p in other] == ["notes.txt"]
    with pytest.raises(P.PredictError, match="no such file"):
        P.find_images([tmp_path / "nope"])


# --- prediction ----------------------------------------------------------------------------


def test_predict_images_rows_per_face_no_face_and_error(tmp_path, faces, clf, detector,
                                                        predict_settings):  # fmt: skip
    _canvas([(faces[0], (30, 40)), (faces[1], (330, 60))], 560, 320).save(tmp_path / "two.jpg")
    Image.fromarray(np.full((200, 200, 3), 180, np.uint8)).save(tmp_path / "wall.jpg")
    (tmp_path / "bad.jpg").write_text("nope")
    files = [tmp_path / n for n in ("two.jpg", "wall.jpg", "bad.jpg")]
    rows = list(P.predict_images(files, clf, detector, _with(predict_settings, batch_size=1)))
    assert [(Path(r["file"]).name, r["status"]) for r in rows] == [
        ("two.jpg", "ok"), ("two.jpg", "ok"), ("wall.jpg", "no_face"), ("bad.jpg", "error")
    ]  # fmt: skip
    for r in rows[:2]:
        assert r["label"] in ("male", "female")
        assert 0.5 <= r["probability"] <= 1.0
        assert r["probability"] == pytest.approx(
            r["p_male"] if r["label"] == "male" else 1 - r["p_male"], abs=1e-6
        )
    assert rows[0]["x"] < rows[1]["x"]
    s = P.summarize(rows)
    assert (s.files, s.faces, s.no_face, len(s.failed)) == (3, 2, 1, 1)


def test_batching_does_not_change_the_answers(tmp_path, faces, clf, predict_settings):
    files = []
    for i, f in enumerate(faces):
        files.append(tmp_path / f"{i}.jpg")
        f.save(files[-1])
    one = list(P.predict_images(files, clf, None, _with(predict_settings, batch_size=1)))
    many = list(P.predict_images(files, clf, None, _with(predict_settings, batch_size=64)))
    assert [r["label"] for r in one] == [r["label"] for r in many]
    np.testing.assert_allclose([r["p_male"] for r in one], [r["p_male"] for r in many], atol=1e-5)


def test_threshold_comes_from_serving_json_next_to_the_model(tmp_path, model_file):
    import shutil

    shutil.copy(model_file, tmp_path / "model.keras")
    P.ServingConfig(SIZE, "center_crop", 0.8).write(tmp_path / P.SERVING_CONFIG)
    assert load_classifier(str(tmp_path / "model.keras")).config.threshold == 0.8
    assert load_classifier(str(tmp_path / "model.keras"), threshold=0.3).config.threshold == 0.3


# --- the command ----------------------------------------------------------------------------


def test_cli_continues_past_bad_files_and_exits_1_with_a_summary(tmp_path, faces, model_file):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for i, f in enumerate(faces):
        f.save(photos / "sub" / f"{i}.jpg")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (photos / "README.txt").write_text("holiday photos")
    out = tmp_path / "out" / "pred.json"
    result = CliRunner().invoke(app, [
        "predict", str(photos), "--model-uri", str(model_file), "--no-detect",
        "--format", "json", "--output", str(out), "--params", str(tmp_path / "none.yaml"),
    ])  # fmt: skip
    # --params pointing nowhere is an error (only the default params.yaml may be absent)
    assert result.exit_code == 1 and "none.yaml" in result.output
    result = CliRunner().invoke(app, [
        "predict", str(photos), "--model-uri", str(model_file), "--no-detect",
        "--format", "json", "--output", str(out), "--quiet",
    ])  # fmt: skip
    assert result.exit_code == 1, result.output
    rows = json.loads(out.read_text())
    assert len(rows) == 4
    assert [r["status"] for r in rows] == ["error", "ok", "ok", "ok"]
    assert "1 failed" in result.output and "broken.jpg" in result.output
    assert "1 non-image files in the folders left out" in result.output


def test_cli_table_and_csv_and_success_exit(tmp_path, faces, model_file):
    faces[0].save(tmp_path / "face.jpg")
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "face.jpg"), "-m",
                                      str(model_file), "--no-detect"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "face.jpg" in result.output and ("male" in result.output)
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "face.jpg"), "-m",
                                      str(model_file), "--format", "csv"])  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()  # the summary line goes to stderr
    assert lines[0] == ",".join(P.COLUMNS) and lines[1].split(",")[0].endswith("face.jpg")


def test_cli_bad_model_uri_is_one_clear_line(tmp_path, faces):
    faces[0].save(tmp_path / "face.jpg")
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "face.jpg"),
                                      "-m", str(tmp_path / "nope.keras")])  # fmt: skip
    assert result.exit_code == 1
    assert "nope.keras" in result.output and "Traceback" not in result.output
    (tmp_path / "fake.keras").write_text("not a model")
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "face.jpg"),
                                      "-m", str(tmp_path / "fake.keras")])  # fmt: skip
    assert result.exit_code == 1 and "not a loadable Keras model" in result.output
