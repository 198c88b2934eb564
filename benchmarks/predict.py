"""Face detection and prediction speed on real photos: BlazeFace and Haar side by side.

Run from the repository root on a folder of real photos counted in benchmarks/faces.json
(the photos of ageitgey/face_recognition: its `examples/` and `tests/test_images/`, which
are not in this repository; fetch them and pass the checkout, or any folder holding those
two folders):

    uv run python benchmarks/predict.py ~/face_recognition            # everything, ~3 min
    uv run python benchmarks/predict.py ~/face_recognition --speed-images 100 --skip-vgg16

In one run, for each detector of `predict.detector` (the params.yaml settings, and the
same with `detector: haar`), it prints:

  * recall on the photos (faces counted by eye in faces.json, matched to the reference
    boxes there) at their own size and fitted into 640x480, and the false detections
    (boxes on no counted face, outside the "don't care" regions);
  * recall on crops cut around each face: tight (a square 1.15x the face box, like a face
    dataset), extra tight (0.9x: forehead and chin at the edges) and tight turned 25 deg;
  * recall on the sample generator's drawn faces (178x218);
  * false detections on face-free images: background regions of the photos away from
    every face, and synthetic textures;
  * `genderclf predict`'s code (`inference.predict_images`) on the photos fitted into
    640x480 JPEGs: images/s, and the share of the wall time in each step, with the demo
    model (and VGG16 at 224 px unless --skip-vgg16), plus `--no-detect` for reference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from PIL import Image

FACES = Path(__file__).with_name("faces.json")
Box = tuple[float, float, float, float]  # x, y, w, h


# --- matching --------------------------------------------------------------------------------


def _iou(a: Box, b: Box) -> float:
    iw = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter + 1e-9)


def _centre_in(a: Box, b: Box) -> bool:
    cx, cy = a[0] + a[2] / 2, a[1] + a[3] / 2
    return b[0] <= cx <= b[0] + b[2] and b[1] <= cy <= b[1] + b[3]


def same_face(det: Box, ref: Box) -> bool:
    """Detectors draw different boxes (Haar wide, the references tall): IoU >= 0.3, or
    each centre inside the other box with sizes within 2.5x."""
    ratio = max(det[2], ref[2]) / max(1e-9, min(det[2], ref[2]))
    return _iou(det, ref) >= 0.3 or (_centre_in(det, ref) and _centre_in(ref, det) and ratio <= 2.5)


def score(dets: list[Box], faces: list[Box], dont_care: list[Box] = ()) -> tuple[int, int]:
    """(faces found, false detections): greedy one-to-one matching; a second box on a face
    already found, or a box on a don't-care region, is neither."""
    found, false, taken = 0, 0, set()
    for d in dets:
        hit = next((i for i, f in enumerate(faces) if i not in taken and same_face(d, f)), None)
        if hit is not None:
            taken.add(hit)
            found += 1
        elif not any(same_face(d, f) for f in faces) and not any(
            same_face(d, c) or _centre_in(d, c) for c in dont_care
        ):
            false += 1
    return found, false


# --- image sets ------------------------------------------------------------------------------


def load_photos(folder: Path, faces: dict) -> list[tuple[str, Image.Image, dict]]:
    """The photos of faces.json found under `folder`, opened as `genderclf predict` opens them."""
    from genderclf.inference import open_rgb

    by_rel = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
    out, missing = [], []
    for rel, entry in faces["photos"].items():
        path = by_rel.get(rel) or next(
            (p for r, p in by_rel.items() if r.endswith("/" + rel)), None
        )
        if path is None:
            missing.append(rel)
            continue
        if entry.get("sha256") and hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
            raise SystemExit(f"{path} differs from the photo counted in {FACES.name}")
        out.append((rel, open_rgb(path, 10**9), entry))
    if missing:
        raise SystemExit(f"not under {folder}: {', '.join(missing)} (see the docstring)")
    return out


def letterbox(im: Image.Image, w: int = 640, h: int = 480) -> tuple[Image.Image, float, int, int]:
    """`im` fitted into w x h (aspect kept, black bars): (image, scale, x0, y0)."""
    s = min(w / im.width, h / im.height)
    small = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.LANCZOS)
    out = Image.new("RGB", (w, h))
    x0, y0 = (w - small.width) // 2, (h - small.height) // 2
    out.paste(small, (x0, y0))
    return out, s, x0, y0


def _moved(b, s: float, x0: float, y0: float) -> Box:
    return (b[0] * s + x0, b[1] * s + y0, b[2] * s, b[3] * s)


def square_crop(im: Image.Image, box, scale: float, out_max: int = 300) -> tuple[Image.Image, Box]:
    """A square `scale` x the box height around the box centre (edge pixels repeated where
    it leaves the photo), at most `out_max` px: (crop, face box in crop pixels)."""
    x, y, w, h = box
    side = max(8, round(h * scale))
    left, top = round(x + w / 2 - side / 2), round(y + h / 2 - side / 2)
    arr = np.asarray(im)
    pad = (
        (max(0, -top), max(0, top + side - arr.shape[0])),
        (max(0, -left), max(0, left + side - arr.shape[1])),
        (0, 0),
    )
    arr = np.pad(arr, pad, mode="edge")
    top, left = top + pad[0][0], left + pad[1][0]
    crop = Image.fromarray(arr[top : top + side, left : left + side])
    s = min(1.0, out_max / side)
    if s < 1.0:
        crop = crop.resize((round(side * s), round(side * s)), Image.LANCZOS)
    face = ((x - (left - pad[1][0])) * s, (y - (top - pad[0][0])) * s, w * s, h * s)
    return crop, face


def rotated(crop: Image.Image, face: Box, deg: float) -> tuple[Image.Image, Box]:
    """The crop turned by `deg` about its centre (edges repeated); the face box stays centred."""
    import cv2

    arr = np.asarray(crop)
    h, w = arr.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), deg, 1.0)
    out = cv2.warpAffine(arr, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    cx, cy = face[0] + face[2] / 2, face[1] + face[3] / 2
    nx, ny = m @ np.array([cx, cy, 1.0])
    return Image.fromarray(out), (nx - face[2] / 2, ny - face[3] / 2, face[2], face[3])


def background_regions(photos, per_photo: int = 1, side_min: int = 160) -> list[Image.Image]:
    """Squares of the photos that touch no face or don't-care box (grown by half its size)."""
    out = []
    for _, im, entry in photos:
        grown = [
            (x - w / 2, y - h / 2, 2 * w, 2 * h)
            for x, y, w, h in entry["boxes"] + entry.get("dont_care", [])
        ]
        side = max(side_min, min(im.size) // 3)
        best = None
        for top in range(0, im.height - side + 1, max(1, side // 4)):
            for left in range(0, im.width - side + 1, max(1, side // 4)):
                sq = (left, top, side, side)
                if any(_iou(sq, g) > 0 or _centre_in(g, sq) for g in grown):
                    continue
                # prefer the busiest region: most texture, most chances to fool a detector
                busy = float(
                    np.asarray(
                        im.crop((left, top, left + side, top + side)).convert("L"), np.float32
                    ).std()
                )
                if best is None or busy > best[0]:
                    best = (busy, sq)
        if best is not None:
            x, y, w, h = best[1]
            out.append(im.crop((x, y, x + w, y + h)))
    return out[: len(photos) * per_photo]


def synthetic_free(n: int = 8, seed: int = 0) -> list[Image.Image]:
    """Face-free 640x480 images: gradient, noise, blurred noise, checkerboard, stripes,
    ellipses, text, a flat wall."""
    from PIL import ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    w, h = 640, 480
    g = np.linspace(0, 255, w, dtype=np.float32)[None, :, None].repeat(h, 0).repeat(3, 2)
    noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    images = [
        Image.fromarray(g.astype(np.uint8)),
        Image.fromarray(noise),
        Image.fromarray(noise).filter(ImageFilter.GaussianBlur(6)),
        Image.fromarray((((yy // 40 + xx // 40) % 2) * 255).astype(np.uint8)).convert("RGB"),
        Image.fromarray(((np.sin(xx / 9.0) > 0) * 200 + 30).astype(np.uint8)).convert("RGB"),
    ]
    im = Image.new("RGB", (w, h), (120, 110, 100))
    d = ImageDraw.Draw(im)
    for _ in range(40):
        x, y = rng.integers(0, w), rng.integers(0, h)
        r = rng.integers(10, 80)
        d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    images.append(im)
    im = Image.new("RGB", (w, h), (250, 250, 245))
    d = ImageDraw.Draw(im)
    for row in range(24):
        d.text(
            (10, 10 + row * 19),
            "The quick brown fox jumps over the lazy dog 0123456789 " * 2,
            fill=(20, 20, 20),
        )
    images.append(im)
    images.append(Image.new("RGB", (w, h), (128, 128, 128)))
    return images[:n]


def drawn_faces(n: int = 120) -> list[Image.Image]:
    from genderclf.data.sample import render

    out = []
    for i in range(n):
        im = render(7, i, i // 2, 0.5, 0.05)
        out.append(im[0] if isinstance(im, tuple) else im)
    return out


# --- recall ----------------------------------------------------------------------------------


def _boxes(det, im: Image.Image) -> list[Box]:
    return [(b.x, b.y, b.w, b.h) for b in det.detect(np.asarray(im))]


def recall_table(detectors: dict, photos, args) -> None:
    sets: dict[str, list[tuple[Image.Image, list[Box], list[Box]]]] = defaultdict(list)
    for _, im, entry in photos:
        if entry.get("duplicate_of"):
            continue  # counted once, under its original
        sets["photos"].append((im, entry["boxes"], entry.get("dont_care", [])))
        small, s, x0, y0 = letterbox(im)
        sets["photos 640x480"].append(
            (
                small,
                [_moved(b, s, x0, y0) for b in entry["boxes"]],
                [_moved(b, s, x0, y0) for b in entry.get("dont_care", [])],
            )
        )
        for box in entry["boxes"]:
            crop, face = square_crop(im, box, 1.15)
            sets["tight crops"].append((crop, [face], []))
            sign = 1 if len(sets["tight crops"]) % 2 else -1  # alternate the direction
            turned, turned_face = rotated(crop, face, 25 * sign)
            sets["tight crops turned 25 deg"].append((turned, [turned_face], []))
            crop, face = square_crop(im, box, 0.9)
            sets["extra-tight crops"].append((crop, [face], []))
    drawn = drawn_faces(args.drawn)
    free = background_regions(photos) + synthetic_free()
    print(
        f"\nRecall (faces found / faces counted) and false detections; "
        f"{len(sets['photos'])} photos, {sum(len(f) for _, f, _ in sets['photos'])} faces"
    )
    names = list(detectors)
    print(f"{'set':<28}{'faces':>6}" + "".join(f"{n:>26}" for n in names))
    for name, items in sets.items():
        total = sum(len(f) for _, f, _ in items)
        cells = []
        for det in detectors.values():
            found = false = 0
            for im, faces, dc in items:
                f, x = score(_boxes(det, im), faces, dc)
                found, false = found + f, false + x
            cells.append(f"{found / total:.2f} ({found:>3}) FP {false:>2}")
        print(f"{name:<28}{total:>6}" + "".join(f"{c:>26}" for c in cells))
    cells = []
    for det in detectors.values():
        counts = [len(det.detect(np.asarray(f))) for f in drawn]
        hits = sum(c >= 1 for c in counts)
        cells.append(
            f"{hits / len(drawn):.2f} ({hits:>3}) FP {sum(max(0, c - 1) for c in counts):>2}"
        )
    print(f"{'drawn faces (generator)':<28}{len(drawn):>6}" + "".join(f"{c:>26}" for c in cells))
    cells = []
    for det in detectors.values():
        fired = sum(len(det.detect(np.asarray(im))) > 0 for im in free)
        cells.append(f"fired on {fired:>2} of {len(free)}")
    print(f"{'face-free images':<28}{len(free):>6}" + "".join(f"{c:>26}" for c in cells))


# --- speed -----------------------------------------------------------------------------------


class Timed:
    """Wraps a method so the run records wall and CPU time per step."""

    def __init__(self) -> None:
        self.t: dict[str, float] = defaultdict(float)

    def wrap(self, obj, method: str, key: str) -> None:
        fn = getattr(obj, method)

        def timed(*a, **kw):
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*a, **kw)
            finally:
                self.t[key] += time.perf_counter() - t0
                self.t[key + " cpu"] += time.thread_time() - c0

        setattr(obj, method, timed)


def run(files: list[Path], clf, detector, cfg) -> dict[str, float]:
    import genderclf.inference as P

    timer = Timed()
    if detector is not None:
        timer.wrap(detector, "detect", "detect")
    timer.wrap(clf, "p_male", "model")
    timer.wrap(clf, "fit", "crop+resize")
    orig_open, orig_crop = P.open_rgb, P.face_crop

    def open_rgb(*a, **kw):
        t0 = time.perf_counter()
        try:
            return orig_open(*a, **kw)
        finally:
            timer.t["read+decode"] += time.perf_counter() - t0

    def face_crop(*a, **kw):
        t0 = time.perf_counter()
        try:
            return orig_crop(*a, **kw)
        finally:
            timer.t["crop+resize"] += time.perf_counter() - t0

    P.open_rgb, P.face_crop = open_rgb, face_crop
    try:
        # warm-up pass, outside the timing: Keras traces the model once per batch shape
        list(P.predict_images(files, clf, detector, cfg))
        timer.t.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        rows = list(P.predict_images(files, clf, detector, cfg))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        P.open_rgb, P.face_crop = orig_open, orig_crop
        for m in ("p_male", "fit"):
            vars(clf).pop(m, None)
        if detector is not None:
            vars(detector).pop("detect", None)
    faces = sum(r["status"] == "ok" for r in rows)
    return {"wall": wall, "cpu": cpu, "images": len(files), "faces": faces, **timer.t}


def report(name: str, r: dict[str, float]) -> None:
    steps = ("read+decode", "detect", "crop+resize", "model")
    shares = "  ".join(f"{s} {100 * r.get(s, 0.0) / r['wall']:4.1f}%" for s in steps)
    n = r["images"]
    det = (
        f"; detection {1000 * r['detect'] / n:.1f} ms/img wall, "
        f"{1000 * r['detect cpu'] / n:.1f} ms CPU"
        if "detect" in r
        else ""
    )
    print(
        f"{name:<36} {n / r['wall']:6.1f} img/s {r['faces'] / r['wall']:6.1f} faces/s "
        f"({r['faces']:>4} faces) | {shares} | {1000 * r['cpu'] / n:.1f} ms CPU/img "
        f"(all threads){det}"
    )


def speed_table(detectors: dict, photos, settings, args) -> None:
    from genderclf.contracts import ModelInput
    from genderclf.inference import Classifier, ServingConfig
    from genderclf.model.backbones import build_model

    with tempfile.TemporaryDirectory() as tmp:
        files = []
        originals = [im for _, im, e in photos if not e.get("duplicate_of")]
        for i in range(args.speed_images):
            files.append(Path(tmp) / f"{i:05d}.jpg")
            letterbox(originals[i % len(originals)])[0].save(files[-1], quality=92)
        size = settings.base.image_size
        print(
            f"\nSpeed: {len(files)} JPEGs, 640x480 (the {len(originals)} photos fitted, "
            f"repeated), batch {settings.predict.batch_size}, {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.1f} at the start"
        )
        demo = Classifier(
            build_model(settings.train, size), ServingConfig.of(ModelInput(size, "center_crop"))
        )
        results = {}
        for name, det in detectors.items():
            results[name] = run(files, demo, det, settings.predict)
            report(f"{settings.train.backbone} {size}px, {name}", results[name])
        no_det = run(files, demo, None, settings.predict)
        report(f"{settings.train.backbone} {size}px, --no-detect", no_det)
        if not args.skip_vgg16:
            vgg16 = settings.train.model_copy(update={"backbone": "vgg16"})
            vgg = Classifier(
                build_model(vgg16, 224), ServingConfig.of(ModelInput(224, "center_crop"))
            )
            first = next(iter(detectors))
            report(f"vgg16 224px, {first}", run(files, vgg, detectors[first], settings.predict))
        for name, r in results.items():
            print(
                f"{name}: face detection is {100 * r['detect'] / r['wall']:.1f}% of the wall "
                f"time; with detection predict takes {r['wall'] / no_det['wall']:.2f}x the "
                f"--no-detect time"
            )
        print(f"load average {os.getloadavg()[0]:.1f} at the end")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("photos", type=Path, help="folder holding examples/ and tests/test_images/")
    ap.add_argument("--speed-images", type=int, default=300)
    ap.add_argument("--drawn", type=int, default=120, help="drawn faces for the recall table")
    ap.add_argument("--skip-vgg16", action="store_true")
    args = ap.parse_args()

    from genderclf import config as C
    from genderclf.console import quiet_tensorflow
    from genderclf.faces import make_detector

    quiet_tensorflow()
    settings = C.load_settings()  # run from the repository root
    cfg = settings.predict
    detectors = {
        f"{cfg.detector} (params.yaml)": make_detector(cfg),
        "haar" if cfg.detector != "haar" else "blazeface": make_detector(
            cfg.model_copy(update={"detector": "haar" if cfg.detector != "haar" else "blazeface"})
        ),
    }
    faces = json.loads(FACES.read_text())
    photos = load_photos(args.photos.expanduser(), faces)
    recall_table(detectors, photos, args)
    speed_table(detectors, photos, settings, args)


if __name__ == "__main__":
    main()
