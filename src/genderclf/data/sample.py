"""Deterministic synthetic faces written in the exact on-disk layout of Kaggle's CelebA.

The sample lets the whole pipeline run offline. Layout (as `jessicali9530/celeba-dataset`):

    img_align_celeba/img_align_celeba/000001.jpg ...   178x218 JPEG
    list_attr_celeba.csv        image_id + the 40 attributes in {-1, 1}
    list_eval_partition.csv     image_id,partition (0 train, 1 val, 2 test), identity-disjoint
    identity_CelebA.txt         "000001.jpg 17" (as in the original CelebA release)

How hard it is, and why. Each face carries five gender cues, each drawn from overlapping
distributions: hair length, jaw width, eyebrow thickness, facial hair and lipstick/eye
make-up. Hats hide most of the hair, glasses cover the eyebrows, pose, lighting, clutter
and sensor noise vary per image, so no single pixel or cue decides the label. On top of
that, a fraction `cue_flip_fraction` (default 3%) of faces is drawn with all the cues of
the other class while keeping its true label, the way CelebA has label noise and
androgynous faces. No model can get those right, so the Bayes accuracy ceiling is about
`1 - cue_flip_fraction` = 97% by default; a small CNN gets into the low-to-mid 90s.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from genderclf.console import Progress
from genderclf.data.celeba import (
    CELEBA_ATTR,
    CELEBA_ATTRIBUTES,
    CELEBA_IDENTITY,
    CELEBA_IMAGES,
    CELEBA_PARTITION,
)
from genderclf.io import parallel_map

WIDTH, HEIGHT = 178, 218
# The on-disk names are the CelebA reader's (one definition, in layouts).
IMAGE_SUBDIR = CELEBA_IMAGES
ATTR_FILE = CELEBA_ATTR
PARTITION_FILE = CELEBA_PARTITION
IDENTITY_FILE = CELEBA_IDENTITY

# Base rates of the attributes the drawing does not use (roughly CelebA's).
_BASE_RATES = {
    "Attractive": 0.51,
    "Bags_Under_Eyes": 0.2,
    "Bangs": 0.15,
    "Big_Lips": 0.24,
    "Blurry": 0.05,
    "Chubby": 0.06,
    "Double_Chin": 0.05,
    "High_Cheekbones": 0.45,
    "Mouth_Slightly_Open": 0.48,
    "Narrow_Eyes": 0.12,
    "Oval_Face": 0.28,
    "Pointy_Nose": 0.28,
    "Receding_Hairline": 0.08,
    "Rosy_Cheeks": 0.07,
    "Straight_Hair": 0.21,
    "Wavy_Hair": 0.32,
    "Wearing_Necklace": 0.12,
}

_HAIR_COLORS = {
    "Black_Hair": (25, 20, 18),
    "Brown_Hair": (95, 60, 35),
    "Blond_Hair": (215, 180, 110),
    "Gray_Hair": (160, 160, 160),
}


def _identity_traits(
    seed: int, identity: int, male_fraction: float, forced: dict[str, bool] | None = None
) -> dict:
    """Traits fixed for a person across their images (`forced`: Young/Pale_Skin overrides)."""
    rng = np.random.default_rng([seed, 1, identity])
    male = bool(rng.random() < male_fraction)
    young = bool(rng.random() < 0.77)
    pale = bool(rng.random() < 0.05)
    young = (forced or {}).get("Young", young)
    pale = (forced or {}).get("Pale_Skin", pale)
    tone = rng.uniform(0.45, 1.0) if not pale else rng.uniform(0.95, 1.05)
    skin = tuple(int(min(255, c * tone)) for c in (235, 190, 160))
    hair = (
        "Gray_Hair"
        if (not young and rng.random() < 0.5)
        else str(rng.choice(["Black_Hair", "Brown_Hair", "Blond_Hair"], p=[0.45, 0.35, 0.2]))
    )
    return {
        "male": male,
        "young": young,
        "pale": pale,
        "skin": skin,
        "hair": hair,
        "width": rng.normal(0.0, 1.0),
        "big_nose": bool(rng.random() < 0.23),
        "bald": male and not young and rng.random() < 0.3,
    }


def _partition(seed: int, identity: int) -> int:
    # Partition by identity, so no person is in two splits (as CelebA's official split).
    u = np.random.default_rng([seed, 2, identity]).random()
    return 0 if u < 0.8 else (1 if u < 0.9 else 2)


def render(
    seed: int,
    index: int,
    identity: int,
    male_fraction: float,
    cue_flip: float,
    forced: dict[str, bool] | None = None,
):
    """Draw image `index` (0-based) of person `identity`.

    Args:
        forced: attributes to set whatever the draw says (see `coverage`).

    Returns:
        (PIL.Image, dict of the 40 attributes in {-1, 1})
    """
    forced = forced or {}
    t = _identity_traits(seed, identity, male_fraction, forced)
    rng = np.random.default_rng([seed, 3, index])
    # The cues shown follow the presented gender; a few faces present the other one.
    shown_male = t["male"] != bool(rng.random() < cue_flip)
    a = {k: bool(rng.random() < p) for k, p in _BASE_RATES.items()}
    a.update(Male=t["male"], Young=t["young"], Pale_Skin=t["pale"], Big_Nose=t["big_nose"])
    a["Eyeglasses"] = forced.get("Eyeglasses", rng.random() < 0.07)
    a["Wearing_Hat"] = forced.get("Wearing_Hat", rng.random() < 0.05)
    a["Smiling"] = rng.random() < 0.48
    a["Bald"] = t["bald"] and not a["Wearing_Hat"]
    a["Heavy_Makeup"] = (not shown_male) and rng.random() < 0.6
    a["Wearing_Lipstick"] = rng.random() < (0.75 if not shown_male else 0.02)
    beard = shown_male and rng.random() < 0.4
    a["No_Beard"] = not beard
    a["Mustache"] = beard and rng.random() < 0.5
    a["Goatee"] = beard and rng.random() < 0.4
    a["Sideburns"] = beard and rng.random() < 0.4
    a["5_o_Clock_Shadow"] = shown_male and not beard and rng.random() < 0.3
    a["Wearing_Earrings"] = rng.random() < (0.35 if not shown_male else 0.03)
    a["Wearing_Necktie"] = shown_male and rng.random() < 0.15
    long_hair = rng.random() < (0.85 if not shown_male else 0.1)
    a["Bushy_Eyebrows"] = shown_male and rng.random() < 0.3
    a["Arched_Eyebrows"] = (not shown_male) and rng.random() < 0.6
    for name in _HAIR_COLORS:
        a[name] = t["hair"] == name and not a["Bald"]

    img = Image.new("RGB", (WIDTH, HEIGHT), tuple(int(c) for c in rng.integers(40, 220, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):  # background clutter
        x0, y0 = rng.integers(-40, WIDTH), rng.integers(-40, HEIGHT)
        w, h = rng.integers(20, 120, 2)
        fill = tuple(int(c) for c in rng.integers(30, 230, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x0 + w, y0 + h], fill=fill)

    cx = WIDTH / 2 + rng.normal(0, 4)
    cy = 118 + rng.normal(0, 4)
    scale = rng.uniform(0.92, 1.08)
    # Jaw width: wider for the presented-male face, with overlap between the classes.
    hw = scale * (40 + (3.5 if shown_male else -2.0) + 2.0 * t["width"] + rng.normal(0, 1))
    hh = scale * 52
    hair_rgb = _HAIR_COLORS[t["hair"]]
    clothes = tuple(int(c) for c in rng.integers(20, 230, 3))

    d.rectangle([cx - hw * 0.45, cy + hh * 0.6, cx + hw * 0.45, HEIGHT], fill=t["skin"])  # neck
    d.ellipse([cx - hw * 2.2, cy + hh * 1.05, cx + hw * 2.2, cy + hh * 2.6], fill=clothes)
    if long_hair and not a["Bald"]:
        d.rounded_rectangle(
            [cx - hw * 1.25, cy - hh * 1.1, cx + hw * 1.25, cy + hh * rng.uniform(0.9, 1.5)],
            radius=int(hw * 0.6),
            fill=hair_rgb,
        )
    if a["Wearing_Necktie"]:
        d.polygon(
            [(cx, cy + hh * 1.1), (cx - 6, cy + hh * 1.9), (cx + 6, cy + hh * 1.9)],
            fill=(150, 20, 30),
        )
    d.ellipse([cx - hw, cy - hh, cx + hw, cy + hh], fill=t["skin"])
    if not a["Bald"]:  # top hair, shorter for short hair
        d.chord(
            [cx - hw * 1.05, cy - hh * 1.12, cx + hw * 1.05, cy + hh * 0.2], 180, 360, fill=hair_rgb
        )
    if not t["young"]:  # wrinkles
        for k in range(2):
            y = cy - hh * 0.55 + 5 * k
            d.line([cx - hw * 0.4, y, cx + hw * 0.4, y], fill=_shade(t["skin"], 0.7), width=1)
    if beard or a["5_o_Clock_Shadow"]:
        tone = _shade(hair_rgb, 1.0) if beard else _shade(t["skin"], 0.75)
        d.chord([cx - hw, cy - hh * 0.3, cx + hw, cy + hh], 20, 160, fill=tone)
    eye_y = cy - hh * 0.12
    brow = (4.5 if shown_male else 2.2) + rng.normal(0, 0.6) + 1.5 * a["Bushy_Eyebrows"]
    for sx in (-1, 1):
        ex = cx + sx * hw * 0.42
        if a["Heavy_Makeup"]:
            d.ellipse([ex - 10, eye_y - 7, ex + 10, eye_y + 6], fill=(110, 60, 120))
        d.ellipse([ex - 7, eye_y - 4, ex + 7, eye_y + 4], fill=(245, 245, 245))
        d.ellipse([ex - 3, eye_y - 3, ex + 3, eye_y + 3], fill=(40, 30, 20))
        by = eye_y - 10 - (3 if a["Arched_Eyebrows"] else 0)
        d.line(
            [ex - 9, eye_y - 9, ex, by, ex + 9, eye_y - 9],
            fill=_shade(hair_rgb, 0.6),
            width=max(1, round(brow)),
        )
        if a["Wearing_Earrings"]:
            d.ellipse([cx + sx * hw - 3, cy + 4, cx + sx * hw + 3, cy + 10], fill=(230, 200, 60))
    nose = 9 if t["big_nose"] else 6
    d.line(
        [cx, eye_y + 4, cx - 3, eye_y + 18 + nose, cx + 3, eye_y + 18 + nose],
        fill=_shade(t["skin"], 0.7),
        width=2,
    )
    mouth_y = cy + hh * 0.5
    lips = (190, 30, 50) if a["Wearing_Lipstick"] else _shade(t["skin"], 0.7)
    if a["Smiling"]:
        d.chord([cx - 14, mouth_y - 8, cx + 14, mouth_y + 8], 0, 180, fill=lips)
    else:
        d.ellipse([cx - 12, mouth_y - 3, cx + 12, mouth_y + 4], fill=lips)
    if a["Mustache"]:
        d.line([cx - 12, mouth_y - 7, cx + 12, mouth_y - 7], fill=_shade(hair_rgb, 0.8), width=4)
    if a["Eyeglasses"]:
        for sx in (-1, 1):
            ex = cx + sx * hw * 0.42
            d.rectangle([ex - 12, eye_y - 13, ex + 12, eye_y + 8], outline=(15, 15, 15), width=3)
        d.line(
            [cx - hw * 0.42 + 12, eye_y - 3, cx + hw * 0.42 - 12, eye_y - 3],
            fill=(15, 15, 15),
            width=3,
        )
    if a["Wearing_Hat"]:
        hat = tuple(int(c) for c in rng.integers(10, 200, 3))
        d.chord([cx - hw * 1.3, cy - hh * 1.5, cx + hw * 1.3, cy - hh * 0.2], 180, 360, fill=hat)
        d.rectangle([cx - hw * 1.5, cy - hh * 0.55, cx + hw * 1.5, cy - hh * 0.42], fill=hat)

    img = img.rotate(rng.normal(0, 5), resample=Image.BILINEAR, fillcolor=(0, 0, 0))
    px = np.asarray(img, dtype=np.float32) * rng.uniform(0.65, 1.3)  # lighting
    px += rng.normal(0, 7, px.shape).astype(np.float32)  # sensor noise
    img = Image.fromarray(np.clip(px, 0, 255).astype(np.uint8))
    return img, {k: (1 if a.get(k, False) else -1) for k in CELEBA_ATTRIBUTES}


def _shade(rgb: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    return tuple(int(min(255, c * f)) for c in rgb)  # type: ignore[return-value]


def _identity_of(seed: int, n: int, per_identity: int) -> np.ndarray:
    # Images of one person are spread over the file numbering, as in CelebA.
    perm = np.random.default_rng([seed, 4]).permutation(n)
    return 1 + perm // per_identity


def coverage(seed: int, identities: np.ndarray) -> dict[int, dict[str, bool]]:
    """{image index: forced attributes}, so that every partition holds both values of the
    attributes evaluate slices by (Young, Pale_Skin, Eyeglasses, Wearing_Hat).

    At their natural rates a small split often lacks one (5% of people are pale: a test
    split of 30 people has none one time in five). Per partition: the first person is
    drawn pale and old, the second neither, the third pale; the first image there wears
    glasses and the second a hat. Heavy_Makeup follows presentation (about 60% of images
    presenting female) and needs no help.
    """
    people: dict[int, list[int]] = {}
    images: dict[int, list[int]] = {}
    for i, ident in enumerate(identities):
        part = _partition(seed, int(ident))
        if int(ident) not in people.setdefault(part, []):
            people[part].append(int(ident))
        images.setdefault(part, []).append(i)
    by_person: dict[int, dict[str, bool]] = {}
    for ids in people.values():
        for ident, force in zip(
            ids,
            (
                {"Pale_Skin": True, "Young": False},
                {"Pale_Skin": False, "Young": True},
                {"Pale_Skin": True},
            ),
            strict=False,
        ):
            by_person.setdefault(ident, {}).update(force)
    out = {i: dict(by_person.get(int(identities[i]), {})) for i in range(len(identities))}
    for idx in images.values():
        for i, attr in zip(idx, ("Eyeglasses", "Wearing_Hat"), strict=False):
            out[i][attr] = True
    return {i: f for i, f in out.items() if f}


def _work(job: dict, chunk: tuple[int, int]) -> list[tuple[int, int, dict]]:
    rows = []
    img_dir = Path(job["root"]) / IMAGE_SUBDIR
    for i in range(*chunk):
        ident = int(job["identities"][i])
        img, attrs = render(
            job["seed"], i, ident, job["male_fraction"], job["cue_flip"], job["forced"].get(i)
        )
        img.save(img_dir / f"{i + 1:06d}.jpg", quality=90)
        rows.append((i, ident, attrs))
    return rows


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def generate(
    root: str | os.PathLike[str],
    num_images: int,
    *,
    seed: int,
    images_per_identity: int,
    male_fraction: float,
    cue_flip_fraction: float,
    workers: int = 1,
    progress: bool = True,
) -> int:
    """Write the synthetic CelebA-format dataset under `root` (which must exist).

    Deterministic for a given seed and size, whatever the number of workers.

    Returns:
        The number of images written.
    """
    root = Path(root)
    (root / IMAGE_SUBDIR).mkdir(parents=True, exist_ok=True)
    identities = _identity_of(seed, num_images, images_per_identity)
    job = {
        "root": str(root),
        "seed": seed,
        "identities": identities,
        "male_fraction": male_fraction,
        "cue_flip": cue_flip_fraction,
        "forced": coverage(seed, identities),
    }
    chunks = list(_chunks(num_images, 256))
    with (
        open(root / ATTR_FILE, "w", newline="") as fa,
        open(root / PARTITION_FILE, "w", newline="") as fp,
        open(root / IDENTITY_FILE, "w") as fi,
        Progress(num_images, "sample", enabled=progress) as bar,
    ):
        wa, wp = csv.writer(fa), csv.writer(fp)
        wa.writerow(["image_id", *CELEBA_ATTRIBUTES])
        wp.writerow(["image_id", "partition"])
        # cluster=False: the workers write into `root`, a folder of this machine.
        for rows in parallel_map(_work, chunks, workers=workers, context=job, cluster=False):
            for i, ident, attrs in rows:
                name = f"{i + 1:06d}.jpg"
                wa.writerow([name, *(attrs[k] for k in CELEBA_ATTRIBUTES)])
                wp.writerow([name, _partition(seed, ident)])
                fi.write(f"{name} {ident}\n")
            bar.update(len(rows))
    return num_images
