"""The synthetic sample: exact CelebA on-disk layout, identity-disjoint partitions, determinism."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from genderclf.data import sample
from genderclf.data.layouts import detect_layout
from genderclf.io import iter_files, tree_checksum

N = 60


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample")
    assert (
        sample.generate(
            root,
            N,
            seed=7,
            images_per_identity=4,
            male_fraction=0.42,
            cue_flip_fraction=0.03,
            workers=1,
            progress=False,
        )
        == N
    )
    return root


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def test_image_files_in_kaggle_layout(generated):
    img_dir = generated / "img_align_celeba" / "img_align_celeba"
    names = sorted(p.name for p in img_dir.iterdir())
    assert names == [f"{i:06d}.jpg" for i in range(1, N + 1)]
    for name in (names[0], names[-1]):
        with Image.open(img_dir / name) as im:
            assert im.format == "JPEG"
            assert im.size == (178, 218)
            assert im.mode == "RGB"
    top = sorted(p.name for p in generated.iterdir())
    assert top == sorted(
        [
            "img_align_celeba",
            "list_attr_celeba.csv",
            "list_eval_partition.csv",
            "identity_CelebA.txt",
        ]
    )
    assert detect_layout(generated) == "celeba"


def test_attribute_file(generated):
    header, rows = _read_csv(generated / "list_attr_celeba.csv")
    assert header[0] == "image_id"
    assert len(header) == 41
    assert header[1:] == sample.CELEBA_ATTRIBUTES
    assert "Male" in header
    assert [r[0] for r in rows] == [f"{i:06d}.jpg" for i in range(1, N + 1)]
    values = {v for r in rows for v in r[1:]}
    assert values <= {"-1", "1"}
    male = header.index("Male")
    males = sum(r[male] == "1" for r in rows)
    assert 0 < males < N  # both classes present


def test_partitions_are_identity_disjoint(generated):
    header, rows = _read_csv(generated / "list_eval_partition.csv")
    assert header == ["image_id", "partition"]
    partition = {r[0]: r[1] for r in rows}
    assert set(partition.values()) <= {"0", "1", "2"}
    assert len(partition) == N
    identity = dict(
        line.split() for line in (generated / "identity_CelebA.txt").read_text().splitlines()
    )
    assert set(identity) == set(partition)
    parts_of = defaultdict(set)
    for image_id, person in identity.items():
        parts_of[person].add(partition[image_id])
    assert len(parts_of) > 1
    assert all(len(p) == 1 for p in parts_of.values()), "a person is in two partitions"


def test_male_label_is_constant_per_identity(generated):
    header, rows = _read_csv(generated / "list_attr_celeba.csv")
    male = header.index("Male")
    identity = dict(
        line.split() for line in (generated / "identity_CelebA.txt").read_text().splitlines()
    )
    labels = defaultdict(set)
    for r in rows:
        labels[identity[r[0]]].add(r[male])
    assert all(len(v) == 1 for v in labels.values())


def _bytes_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in iter_files(root)}


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    # More than one 256-image chunk, so that two workers really share the work.
    n = 300
    a, b = tmp_path / "a", tmp_path / "b"
    for root, workers in ((a, 1), (b, 2)):
        root.mkdir()
        sample.generate(
            root,
            n,
            seed=3,
            images_per_identity=5,
            male_fraction=0.42,
            cue_flip_fraction=0.03,
            workers=workers,
            progress=False,
        )
    files_a, files_b = _bytes_of(a), _bytes_of(b)
    assert len(files_a) == n + 3
    assert files_a == files_b
    assert tree_checksum(a) == tree_checksum(b)


def test_render_is_pure():
    img1, attrs1 = sample.render(1, 5, 2, 0.5, 0.0)
    img2, attrs2 = sample.render(1, 5, 2, 0.5, 0.0)
    assert attrs1 == attrs2
    assert img1.tobytes() == img2.tobytes()
    assert set(attrs1) == set(sample.CELEBA_ATTRIBUTES)
    img3, _ = sample.render(2, 5, 2, 0.5, 0.0)  # another seed, another image
    assert img3.tobytes() != img1.tobytes()


@pytest.mark.parametrize("male_fraction", [0.0, 1.0])
def test_male_fraction_is_followed(tmp_path, male_fraction):
    sample.generate(
        tmp_path,
        20,
        seed=1,
        images_per_identity=10,
        male_fraction=male_fraction,
        cue_flip_fraction=0.03,
        workers=1,
        progress=False,
    )
    header, rows = _read_csv(tmp_path / "list_attr_celeba.csv")
    male = header.index("Male")
    assert {r[male] for r in rows} == {"1" if male_fraction else "-1"}


@pytest.mark.parametrize(("n", "per_person"), [(120, 4), (600, 4), (3000, 10)])
def test_every_split_has_both_values_of_the_evaluated_attributes(tmp_path, n, per_person):
    """No slice evaluate reports is empty in any split, even on small samples."""
    import pandas as pd

    from genderclf.data.layouts import read_layout

    sample.generate(
        tmp_path,
        n,
        seed=42,
        images_per_identity=per_person,
        male_fraction=0.42,
        cue_flip_fraction=0.03,
        workers=1,
        progress=False,
    )
    rows = read_layout(tmp_path).rows
    for part, df in rows.groupby("partition"):
        for attr in ("Young", "Pale_Skin", "Eyeglasses", "Wearing_Hat"):
            values = set(pd.to_numeric(df[attr]).astype(int))
            assert values == {0, 1}, (part, attr, values)
