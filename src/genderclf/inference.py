"""Inference on new photos, one path for `genderclf predict` and the served model.

Real photos are not aligned face crops. Each image is read safely (`genderclf.images`:
size checked before decoding, EXIF orientation applied, any colour mode converted to
RGB), faces are found by the detector `predict.detector` names (`genderclf.faces`:
BlazeFace by default, OpenCV's Haar cascade as the light fallback; no runtime download),
each face is cut out as a square around the detector's box (`predict.crop_scale`,
`predict.crop_shift_y`) and resized like the training data. Without a detector the whole
image is fitted the way the augment stage fits val/test images (already-cropped faces).

One bad file never stops a batch: it becomes a row with `status: error` and a reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from PIL import Image

from genderclf.config import GenderclfError, PredictSettings
from genderclf.contracts import Evaluation, ModelInput, TrainedModel
from genderclf.data.labels import LABEL_NAMES
from genderclf.faces import Box, Detector, DetectorError, make_detector
from genderclf.images import IMAGE_EXTENSIONS, ImageError, fit_square, load_rgb
from genderclf.io import atomic_file, atomic_write

SERVING_CONFIG = "serving.json"
# The cut on P(male) of a bare .keras file that carries no threshold of its own.
DEFAULT_THRESHOLD = 0.5

__all__ = ["Box", "Detector", "DetectorError", "ImageError", "make_detector"]


class PredictError(GenderclfError):
    """The model cannot be loaded or the request is unusable as a whole."""


@dataclass(frozen=True)
class ServingConfig:
    """What inference must repeat from training, stored with the model (`serving.json`).

    Made in one place, `ServingConfig.of`, from the hand-off contracts: image_size and
    resize from the trained model (`TrainedModel.input`, i.e. the prepared data),
    threshold and calibration from the evaluation, and `predict` the `predict` section of
    params.yaml at registration (detection and cropping), so a registered model predicts
    the same way without a params.yaml. `read` loads the stored one.
    """

    image_size: int
    resize: str
    threshold: float  # the cut on the model's raw output
    predict: dict[str, Any] | None = None
    calibration: tuple[float, float] = (1.0, 0.0)  # Platt (a, b): P = sigmoid(a*logit(p)+b)

    @classmethod
    def of(
        cls,
        model: ModelInput,
        evaluation: Evaluation | None = None,
        predict: dict[str, Any] | None = None,
    ) -> ServingConfig:
        """The serving config of a model: its input, the operating point its evaluation
        chose (the cut on the raw output, the Platt calibration; a model never evaluated
        cuts its raw output at `DEFAULT_THRESHOLD`), and the `predict` settings to store."""
        if evaluation is None:
            return cls(model.image_size, model.resize, DEFAULT_THRESHOLD, predict)
        return cls(
            model.image_size,
            model.resize,
            evaluation.threshold_raw,
            predict,
            evaluation.calibration.platt,
        )

    def write(self, path: Path) -> Path:
        return atomic_write(path, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, path: str | Path) -> ServingConfig:
        raw = json.loads(Path(path).read_text())
        a, b = raw.get("calibration") or (1.0, 0.0)
        return cls(
            int(raw["image_size"]),
            str(raw["resize"]),
            float(raw["threshold"]),
            raw.get("predict"),
            (float(a), float(b)),
        )

    def calibrate(self, p: np.ndarray) -> np.ndarray:
        """The model's raw P(male) as the calibrated probability evaluation reported."""
        a, b = self.calibration
        if (a, b) == (1.0, 0.0):
            return np.asarray(p, dtype=np.float64)
        q = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
        return 1.0 / (1.0 + np.exp(-(a * np.log(q / (1 - q)) + b)))

    def predict_settings(self) -> PredictSettings | None:
        """The stored `predict` section, validated (None when the model carries none).

        Raises:
            PredictError: the stored section does not fit this genderclf's settings (a
                model registered by an older version: e.g. no `predict.detector`).
        """
        if not self.predict:
            return None
        from pydantic import ValidationError

        try:
            return PredictSettings.model_validate(self.predict)
        except ValidationError as err:
            keys = ", ".join(
                sorted({f"predict.{'.'.join(map(str, e['loc']))}" for e in err.errors()})
            )
            raise PredictError(
                f"the `predict` settings stored with this model do not fit this "
                f"genderclf ({keys}): run from the project with its params.yaml, "
                "pass --params, or re-register the model"
            ) from None


# --- images ----------------------------------------------------------------------------------


def open_rgb(source: str | os.PathLike[str] | bytes, max_pixels: int) -> Image.Image:
    """An image file or encoded bytes as upright RGB (see `genderclf.images.load_rgb`).

    Raises:
        ImageError: not an image, truncated or corrupt, or more than `max_pixels` pixels.
    """
    return load_rgb(source, max_pixels, "predict.max_pixels")


def find_images(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[Path], list[Path]]:
    """Expand files and folders (recursively) into (images to classify, files left out).

    A file named explicitly is always tried (a non-image then gets its own error); inside a
    folder only files with an image extension are taken and the rest are returned so the
    caller can say how many were left out.

    Raises:
        PredictError: a path does not exist.
    """
    other: list[Path] = []
    return list(iter_images(paths, other)), other


def iter_images(paths: Iterable[str | os.PathLike[str]], other: list[Path]) -> Iterator[Path]:
    """`find_images`, streamed: the images one by one; the files left out go to `other`.

    Raises:
        PredictError: a path does not exist (when the walk reaches it).
    """
    for p in map(Path, paths):
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for f in sorted(files):
                    fp = Path(root) / f
                    if fp.suffix.lower() in IMAGE_EXTENSIONS:
                        yield fp
                    else:
                        other.append(fp)
        elif p.exists():
            yield p
        else:
            raise PredictError(f"{p}: no such file or folder")


# --- faces -----------------------------------------------------------------------------------


def face_crop(im: Image.Image, box: Box, size: int, scale: float, shift_y: float) -> Image.Image:
    """The square around `box` framed like a CelebA aligned crop, resized to `size`.

    Parts of the square outside the photo are filled by repeating the edge pixels (as the
    training crops never contain black borders).
    """
    side = max(1, round(box.w * scale))
    cx = box.x + box.w / 2
    cy = box.y + box.h / 2 + shift_y * box.w
    left, top = round(cx - side / 2), round(cy - side / 2)
    arr = np.asarray(im)
    h, w = arr.shape[:2]
    pad = ((max(0, -top), max(0, top + side - h)), (max(0, -left), max(0, left + side - w)), (0, 0))
    if any(p for pair in pad[:2] for p in pair):
        arr = np.pad(arr, pad, mode="edge")
        top, left = top + pad[0][0], left + pad[1][0]
    crop = Image.fromarray(arr[top : top + side, left : left + side])
    return crop.resize((size, size), Image.BILINEAR, reducing_gap=2.0)


# --- the model -------------------------------------------------------------------------------


@dataclass
class Classifier:
    """A Keras model (raw RGB 0-255 in, P(male) out) with its serving config."""

    model: Any
    config: ServingConfig
    source: str = ""

    def p_male(self, crops: list[Image.Image] | np.ndarray) -> np.ndarray:
        """P(male) for square crops already at `config.image_size`."""
        if len(crops) == 0:
            return np.zeros(0, dtype=np.float32)
        batch = np.stack([np.asarray(c, dtype=np.float32) for c in crops])
        out = self.model.predict_on_batch(batch)
        return np.asarray(out, dtype=np.float32).reshape(-1)

    def fit(self, im: Image.Image) -> Image.Image:
        """A whole image fitted to the model input as val/test images are (no detection)."""
        return fit_square(im, self.config.image_size, self.config.resize)

    def label(self, p: float) -> tuple[str, float, float]:
        """(label, probability of that label, calibrated P(male)) for the raw score p."""
        male = p >= self.config.threshold
        q = float(self.config.calibrate(np.array([p]))[0])
        return LABEL_NAMES[int(male)], (q if male else 1.0 - q), q


def load_keras(path: str | Path):
    """A `.keras` file, safe mode on (see `genderclf.model.saving.load_model`)."""
    from genderclf.model.saving import ModelLoadError, load_model

    try:
        return load_model(path)
    except (ModelLoadError, FileNotFoundError) as err:
        raise PredictError(str(err)) from None


def model_files(path: Path, source: str = "") -> tuple[Path, Path | None]:
    """The `.keras` file of a model (a file, or a folder such as a downloaded MLflow model)
    and its serving config, if it has one.

    Raises:
        PredictError: no `.keras` file there.
    """
    source = source or str(path)
    if path.is_dir():
        files = sorted(path.rglob("*.keras"))
        if not files:
            raise PredictError(f"{source}: no .keras file in the model (is it a genderclf model?)")
        configs = sorted(path.rglob(SERVING_CONFIG))
        return files[0], (configs[0] if configs else None)
    if path.is_file():
        config = path.parent / SERVING_CONFIG
        return path, (config if config.is_file() else None)
    raise PredictError(f"{source}: no such model file or folder")


def load_local(
    path: str | Path,
    source: str | None = None,
    *,
    config: ServingConfig | None = None,
    bare_resize: str | None = None,
) -> Classifier:
    """A classifier from a `.keras` file or a model folder (an MLflow model, downloaded).

    The serving config is `config` when given, else the model's `serving.json` (beside the
    file, or anywhere in the folder). A bare `.keras` file without one is served as
    trained, cut at `DEFAULT_THRESHOLD`: its input from the `model.json` beside it (the
    train stage's `TrainedModel`), else its own input size fitted the `bare_resize` way.

    Raises:
        PredictError: no loadable genderclf model there, or nothing says how to fit an
            image to it.
    """
    path = Path(path)
    source = source or str(path)
    keras_file, config_file = model_files(path, source)
    model = load_keras(keras_file)
    if config is None and config_file is not None:
        config = ServingConfig.read(config_file)
    if config is None:
        config = ServingConfig.of(_bare_input(keras_file, model, bare_resize, source))
    return Classifier(model, config, source)


def _bare_input(keras_file: Path, model: Any, resize: str | None, source: str) -> ModelInput:
    info = keras_file.with_name("model.json")
    if info.is_file():
        return TrainedModel.read(info).input
    if resize is None:
        raise PredictError(
            f"{source} has no {SERVING_CONFIG} (threshold, resize mode): use a "
            "registered model, or run from the project with its params.yaml"
        )
    return ModelInput(int(model.input_shape[1]), resize)


def with_threshold(clf: Classifier, threshold: float | None) -> Classifier:
    """`clf` with its decision threshold replaced (None keeps the model's own)."""
    if threshold is not None:
        from dataclasses import replace

        clf.config = replace(clf.config, threshold=threshold)
    return clf


def model_payload(path: Path) -> dict[str, bytes]:
    """The files that describe a model, by name relative to its `.keras` file's folder: the
    `.keras` file, its serving config and the train stage's `model.json` beside it (each if
    there), so that `load_local` on a folder of them loads the same classifier.

    Raises:
        PredictError: no `.keras` file there.
    """
    keras_file, config = model_files(path)
    out = {keras_file.name: keras_file.read_bytes()}
    for extra in (config, keras_file.with_name("model.json")):
        if extra is not None and extra.is_file():
            out[extra.name] = extra.read_bytes()
    return out


class Predictor:
    """A classifier that lives in a worker process (a Ray actor on a cluster): the model
    loaded once from `model_payload`'s files, then chunks of images in, rows out."""

    def __init__(
        self,
        files: dict[str, bytes],
        source: str,
        bare_resize: str | None,
        threshold: float | None,
        settings: dict[str, Any],
        detect: bool,
    ):
        import tempfile

        # Removed as soon as the model is in memory: Ray ends an actor's process without
        # running its finalizers, so a folder kept for the actor's life stayed for good.
        with tempfile.TemporaryDirectory(prefix="genderclf-actor-model-") as tmp:
            root = Path(tmp)
            for rel, data in files.items():
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(data)
            clf = load_local(root, source, bare_resize=bare_resize)
        self.clf = with_threshold(clf, threshold)
        self.settings = PredictSettings.model_validate(settings)
        self.detector = make_detector(self.settings) if detect else None

    def rows(self, chunk: list[tuple[str, Any]]) -> list[dict[str, Any]]:
        """The rows of one chunk of (name, source) pairs, in their order."""
        return list(predict_images(chunk, self.clf, self.detector, self.settings))


# --- batch prediction ------------------------------------------------------------------------

COLUMNS = ("file", "face", "x", "y", "w", "h", "label", "probability", "p_male", "status", "error")


@dataclass
class Summary:
    """Counts over the rows of one run, kept as the rows stream past (`add`)."""

    files: int = 0
    faces: int = 0
    no_face: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    left_out: int = 0

    def add(self, row: dict[str, Any]) -> None:
        # Each image gives one row with face None (whole image, no face, error) or rows
        # with faces 0, 1, ...: its first row is the one with face None or 0.
        self.files += row["face"] in (None, 0)
        if row["status"] == "ok":
            self.faces += 1
        elif row["status"] == "no_face":
            self.no_face += 1
        else:
            self.failed.append((row["file"], row["error"]))


def make_row(file: str, **kw: Any) -> dict[str, Any]:
    """One output row for `file`: every column of `COLUMNS`, None unless given."""
    row = dict.fromkeys(COLUMNS)
    row.update(file=file, **kw)
    return row


Source = str | os.PathLike[str] | bytes | Callable[[], bytes]


def predict_images(
    files: Iterable[Path | tuple[str, Source]],
    clf: Classifier,
    detector: Detector | None,
    settings: PredictSettings,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
) -> Iterator[dict[str, Any]]:
    """One row per face (or per image with `detector=None`), per face-less or bad image.

    Rows come in input order. Model calls are batched across files (`settings.batch_size`).

    Args:
        files: image paths (see `find_images`), or (name, source) pairs where the source
            is a path, encoded bytes, or a function returning them (it may raise
            ImageError: that image gets an error row).
        clf: the classifier.
        detector: a face detector, or None to classify whole images.
        settings: the `predict` settings section.
        progress: wraps the file iterable (e.g. a progress bar).
    """
    pending: list[tuple[dict[str, Any], Image.Image]] = []
    ready: list[dict[str, Any]] = []  # rows in input order, some waiting for their score

    def flush() -> Iterator[dict[str, Any]]:
        p = clf.p_male([c for _, c in pending])
        for (row, _), q in zip(pending, p, strict=True):
            label, prob, p_male = clf.label(float(q))
            row.update(label=label, probability=round(prob, 6), p_male=round(p_male, 6))
        pending.clear()
        yield from ready
        ready.clear()

    for f in progress(files) if progress else files:
        name, source = (str(f), f) if isinstance(f, str | os.PathLike) else f
        try:
            im = open_rgb(source() if callable(source) else source, settings.max_pixels)
            if detector is None:
                crops = [(None, clf.fit(im))]
            else:
                boxes = detector.detect(np.asarray(im))
                crops = [
                    (
                        b,
                        face_crop(
                            im, b, clf.config.image_size, settings.crop_scale, settings.crop_shift_y
                        ),
                    )
                    for b in boxes
                ]
        except ImageError as err:
            ready.append(make_row(name, status="error", error=str(err)))
            continue
        if not crops:
            ready.append(make_row(name, status="no_face", error="no face found"))
            continue
        for i, (b, crop) in enumerate(crops):
            box = asdict(b) if b else {}
            row = make_row(name, face=i if b else None, status="ok", **box)
            ready.append(row)
            pending.append((row, crop))
        if len(pending) >= settings.batch_size:
            yield from flush()
    yield from flush()


def summarize(rows: Iterable[dict[str, Any]], left_out: int = 0) -> Summary:
    s = Summary(left_out=left_out)
    for r in rows:
        s.add(r)
    return s


FORMATS = ("table", "json", "jsonl", "csv")


class RowWriter:
    """Writes rows to a text stream as they come, so memory stays flat on big folders.

    `jsonl`: one JSON object per line, flushed after each line (a reader can follow the
    file while the run goes on); `csv`: a header, then one line per row; `json`: one
    array, one object per line, closed by `close()`.
    """

    def __init__(self, fmt: str, stream: TextIO):
        if fmt not in ("json", "jsonl", "csv"):
            raise ValueError(f"no row writer for {fmt!r}")
        self.fmt, self.stream, self.count = fmt, stream, 0
        if fmt == "csv":
            import csv

            self._csv = csv.DictWriter(stream, fieldnames=list(COLUMNS), lineterminator="\n")
            self._csv.writeheader()
        elif fmt == "json":
            stream.write("[")

    def write(self, row: dict[str, Any]) -> None:
        if self.fmt == "csv":
            self._csv.writerow(row)
        elif self.fmt == "jsonl":
            self.stream.write(json.dumps(row) + "\n")
            self.stream.flush()
        else:
            self.stream.write(("," if self.count else "") + "\n  " + json.dumps(row))
        self.count += 1

    def close(self) -> None:
        if self.fmt == "json":
            self.stream.write("\n]\n" if self.count else "]\n")
        self.stream.flush()


@contextlib.contextmanager
def row_writer(fmt: str, out: Path | None) -> Iterator[RowWriter]:
    """A RowWriter to `out`, or to stdout when `out` is None.

    json and csv files are replaced atomically when the block ends (a failed run leaves
    the previous file); a jsonl file is written in place, line by line, so it can be
    followed while the run goes on.
    """
    if out is None:
        w = RowWriter(fmt, sys.stdout)
        yield w
        w.close()
        return
    if fmt == "jsonl":
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as fh:
            w = RowWriter(fmt, fh)
            yield w
            w.close()
        return
    with atomic_file(out) as tmp, tmp.open("w", encoding="utf-8", newline="") as fh:
        w = RowWriter(fmt, fh)
        yield w
        w.close()
