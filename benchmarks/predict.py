"""Batch prediction speed on CPU: images per second, and where the time goes.

Makes N photos (640x480, a textured wall with one or two sample faces pasted on it), then
runs `genderclf.predict.predict_images` over them, as `genderclf predict` does, for:

  * the demo model (simple_cnn at params.yaml's base.image_size), with face detection,
  * the same without detection (`--no-detect`, whole images),
  * VGG16 at 224x224 (the real-data recipe; untrained weights, same compute), with detection.

and prints images/s, faces/s and the share of wall time spent in each step (read+decode,
face detection, crop+resize, the model). Run from the repository root:

    uv run python benchmarks/predict.py            # 300 photos
    uv run python benchmarks/predict.py --photos 1000 --skip-vgg16
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from PIL import Image


def make_photos(folder: Path, n: int, seed: int = 0) -> int:
    """n JPEG photos with 1-2 sample faces each; returns the number of faces pasted."""
    from genderclf.data.sample import render

    rng = np.random.default_rng(seed)
    faces = 0
    for i in range(n):
        # A room-like background: smooth low-frequency shading plus mild sensor noise
        # (pure per-pixel noise is a worst case for Haar cascades that photos are not).
        low = Image.fromarray(rng.integers(40, 200, size=(6, 8, 3), dtype=np.uint8))
        wall = np.asarray(low.resize((640, 480), Image.BICUBIC), dtype=np.int16)
        wall = wall + rng.integers(-4, 5, size=wall.shape)
        im = Image.fromarray(np.clip(wall, 0, 255).astype(np.uint8))
        k = 1 + i % 2
        for j in range(k):
            out = render(seed, i * 2 + j, i, 0.5, 0.0)
            face = out[0] if isinstance(out, tuple) else out
            im.paste(face, (40 + j * 320 + int(rng.integers(0, 60)), int(rng.integers(20, 240))))
        faces += k
        im.save(folder / f"{i:05d}.jpg", quality=90)
    return faces


class Timed:
    """Wraps the detector and classifier so the run records time per step."""

    def __init__(self) -> None:
        self.t: dict[str, float] = defaultdict(float)

    def wrap(self, obj, method: str, key: str) -> None:
        fn = getattr(obj, method)

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.t[key] += time.perf_counter() - t0

        setattr(obj, method, timed)


def run(files: list[Path], clf, detect: bool, cfg) -> dict[str, float]:
    import genderclf.inference as P

    timer = Timed()
    detector = P.FaceDetector.from_settings(cfg) if detect else None
    if detector:
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
        # warm-up: build the predict function once, outside the timing
        list(P.predict_images(files[:2], clf, detector, cfg))
        timer.t.clear()
        t0 = time.perf_counter()
        rows = list(P.predict_images(files, clf, detector, cfg))
        wall = time.perf_counter() - t0
    finally:
        P.open_rgb, P.face_crop = orig_open, orig_crop
        for m in ("p_male", "fit"):
            vars(clf).pop(m, None)
    faces = sum(r["status"] == "ok" for r in rows)
    return {"wall": wall, "images": len(files), "faces": faces, **timer.t}


def report(name: str, r: dict[str, float]) -> None:
    steps = ("read+decode", "detect", "crop+resize", "model")
    shares = "  ".join(f"{s} {100 * r.get(s, 0.0) / r['wall']:4.1f}%" for s in steps)
    print(f"{name:<34} {r['images'] / r['wall']:7.1f} img/s  {r['faces'] / r['wall']:7.1f} "
          f"faces/s  ({r['faces']} faces)  | {shares}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=300)
    ap.add_argument("--skip-vgg16", action="store_true")
    args = ap.parse_args()

    import keras

    from genderclf import config as C
    from genderclf.inference import Classifier, ServingConfig
    from genderclf.model.backbones import build_model

    settings = C.load_settings()  # run from the repository root
    cfg = settings.predict
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pasted = make_photos(folder, args.photos)
        files = sorted(folder.glob("*.jpg"))
        print(f"{len(files)} photos 640x480 with {pasted} faces pasted; {os.cpu_count()} CPUs; "
              f"batch {cfg.batch_size}; keras backend {keras.config.backend()}")  # fmt: skip
        size = settings.base.image_size
        demo = Classifier(
            build_model(settings.train, size), ServingConfig(size, "center_crop", 0.5)
        )
        with_det = run(files, demo, True, cfg)
        report(f"{settings.train.backbone} {size}px, detect", with_det)
        no_det = run(files, demo, False, cfg)
        report(f"{settings.train.backbone} {size}px, --no-detect", no_det)
        if not args.skip_vgg16:
            vgg16 = settings.train.model_copy(update={"backbone": "vgg16"})
            vgg = Classifier(build_model(vgg16, 224), ServingConfig(224, "center_crop", 0.5))
            report("vgg16 224px, detect", run(files, vgg, True, cfg))
        print(f"face detection share of the wall time ({settings.train.backbone}): "
              f"{100 * with_det['detect'] / with_det['wall']:.1f}%; detection costs "
              f"{with_det['wall'] / no_det['wall']:.2f}x the --no-detect time")  # fmt: skip


if __name__ == "__main__":
    main()
