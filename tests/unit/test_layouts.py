"""Dataset layouts on disk -> candidate rows with integer labels (1 male, 0 female)."""

from __future__ import annotations

import pytest

from genderclf.data import labels
from genderclf.data.layouts import (
    BASE_COLUMNS,
    LayoutError,
    detect_layout,
    read_celeba,
    read_class_folders,
    read_layout,
)
from genderclf.data.sample import ATTR_FILE, CELEBA_ATTRIBUTES

# --- labels --------------------------------------------------------------------------------


def test_label_integers_follow_the_contract():
    assert labels.MALE == 1
    assert labels.FEMALE == 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, 1), (-1, 0), ("1", 1), ("-1", 0), (" 1 ", 1), ("1.0", 1), (-1.0, 0)],
)
def test_celeba_male_attribute(value, expected):
    assert labels.label_from_celeba(value) == expected


@pytest.mark.parametrize("value", [2, 0, "0", "", "yes", "male", None, "1.5"])
def test_celeba_male_attribute_rejects_other_values(value):
    with pytest.raises(labels.LabelError, match="is not -1 or 1"):
        labels.label_from_celeba(value)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("male", 1),
        ("Male", 1),
        ("MALE", 1),
        ("man", 1),
        ("men", 1),
        (" Men ", 1),
        ("female", 0),
        ("Female", 0),
        ("woman", 0),
        ("Women", 0),
        ("person", None),
        ("males", None),
        ("", None),
        ("unknown", None),
    ],
)
def test_class_folder_spellings(name, expected):
    assert labels.label_from_folder(name) == expected


# --- class folders -------------------------------------------------------------------------


def _folders(root, spec, make_image):
    """spec: relative folder -> number of images to write there."""
    seed = 0
    for folder, n in spec.items():
        for i in range(n):
            seed += 1
            make_image(root / folder / f"img{i}.jpg", size=(34, 34), seed=seed)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (  # cashutosh/gender-classification-dataset
            {
                "Training/male": 3,
                "Training/female": 2,
                "Validation/male": 1,
                "Validation/female": 2,
            },
            {
                ("Training/male", 1, "train"),
                ("Training/female", 0, "train"),
                ("Validation/male", 1, "val"),
                ("Validation/female", 0, "val"),
            },
        ),
        (  # ashishjangra27/gender-recognition-200k-images-celeba, under a Dataset/ root
            {
                "Dataset/Train/Male": 2,
                "Dataset/Train/Female": 2,
                "Dataset/Test/Male": 1,
                "Dataset/Test/Female": 1,
                "Dataset/Validation/Male": 1,
                "Dataset/Validation/Female": 1,
            },
            {
                ("Dataset/Train/Male", 1, "train"),
                ("Dataset/Train/Female", 0, "train"),
                ("Dataset/Test/Male", 1, "test"),
                ("Dataset/Test/Female", 0, "test"),
                ("Dataset/Validation/Male", 1, "val"),
                ("Dataset/Validation/Female", 0, "val"),
            },
        ),
        (  # man/woman inside partitions
            {"train/man": 2, "train/woman": 2, "test/man": 1, "test/woman": 1},
            {
                ("train/man", 1, "train"),
                ("train/woman", 0, "train"),
                ("test/man", 1, "test"),
                ("test/woman", 0, "test"),
            },
        ),
        (  # a flat root of class folders, no partitions
            {"male": 2, "female": 3},
            {("male", 1, ""), ("female", 0, "")},
        ),
        (  # flat man/woman under a Dataset/ root
            {"Dataset/man": 2, "Dataset/woman": 1},
            {("Dataset/man", 1, ""), ("Dataset/woman", 0, "")},
        ),
    ],
)
def test_class_folder_layouts(tmp_path, make_image, spec, expected):
    _folders(tmp_path, spec, make_image)
    assert detect_layout(tmp_path) == "class_folders"
    cands = read_layout(tmp_path, "auto")
    assert cands.layout == "class_folders"
    assert cands.rejected == []
    rows = cands.rows
    assert len(rows) == sum(spec.values())
    got = {
        (p.rsplit("/", 1)[0], lab, part)
        for p, lab, part in zip(rows["path"], rows["label"], rows["partition"], strict=True)
    }
    assert got == expected
    for folder, n in spec.items():
        assert (rows["path"].str.rsplit("/", n=1).str[0] == folder).sum() == n
    assert all((tmp_path / p).is_file() for p in rows["path"])
    assert set(rows["identity"]) == {""}


def test_class_folders_reject_unknown_classes_and_non_images(tmp_path, make_image):
    _folders(tmp_path, {"Training/male": 2, "Training/female": 2, "Training/other": 1}, make_image)
    (tmp_path / "Training" / "male" / "notes.txt").write_text("hello")
    nested = make_image(tmp_path / "Training" / "female" / "sub" / "deep.jpg", seed=99)
    cands = read_class_folders(tmp_path)
    reasons = dict(cands.rejected)
    assert reasons["Training/other/img0.jpg"].startswith("no_label:")
    assert reasons["Training/male/notes.txt"].startswith("not_an_image:")
    assert len(reasons) == 2
    assert nested.relative_to(tmp_path).as_posix() in set(cands.rows["path"])
    assert len(cands.rows) == 5


def test_loose_images_in_a_partition_folder_are_rejected_not_dropped(tmp_path, make_image):
    _folders(tmp_path, {"Training/male": 1, "Training/female": 1}, make_image)
    make_image(tmp_path / "Training" / "loose.jpg", seed=50)
    (tmp_path / "Training" / "README.txt").write_text("not a dataset file")
    cands = read_class_folders(tmp_path)
    assert dict(cands.rejected) == {
        "Training/loose.jpg": "no_label: image not inside a class folder"
    }
    assert len(cands.rows) == 2


def test_hidden_files_are_ignored(tmp_path, make_image):
    _folders(tmp_path, {"male": 1, "female": 1}, make_image)
    (tmp_path / "male" / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.jpg").write_bytes(b"x")
    cands = read_layout(tmp_path)
    assert len(cands.rows) == 2
    assert cands.rejected == []


# --- celeba --------------------------------------------------------------------------------


def test_celeba_layout(tmp_path, make_celeba):
    ids = make_celeba(tmp_path, [1, 0, 1, 0], partitions=[0, 1, 2, 0], identities=[5, 6, 7, 5])
    assert detect_layout(tmp_path) == "celeba"
    cands = read_layout(tmp_path, "auto")
    assert cands.layout == "celeba"
    assert cands.rejected == []
    assert [c for c in cands.rows.columns if c not in BASE_COLUMNS] == CELEBA_ATTRIBUTES
    rows = cands.rows.set_index("path")
    paths = [f"img_align_celeba/img_align_celeba/{i}" for i in ids]
    assert list(rows.index) == paths
    assert list(rows["label"]) == [1, 0, 1, 0]
    assert list(rows["partition"]) == ["train", "val", "test", "train"]
    assert list(rows["identity"]) == ["5", "6", "7", "5"]
    assert list(rows["Male"]) == [1, 0, 1, 0]  # attributes as 1/0
    assert set(rows["Smiling"]) == {0}


def test_celeba_without_partition_and_identity_files(tmp_path, make_celeba):
    make_celeba(tmp_path, [1, 0])
    cands = read_celeba(tmp_path)
    assert list(cands.rows["partition"]) == ["", ""]
    assert list(cands.rows["identity"]) == ["", ""]


def test_celeba_nested_in_a_folder_and_single_image_level(tmp_path, make_celeba):
    base = tmp_path / "celeba-dataset"
    make_celeba(base, [1, 0])
    # Some copies have the images one level up: img_align_celeba/*.jpg
    inner = base / "img_align_celeba" / "img_align_celeba"
    for p in inner.iterdir():
        p.rename(base / "img_align_celeba" / p.name)
    inner.rmdir()
    cands = read_layout(tmp_path)
    assert cands.layout == "celeba"
    assert list(cands.rows["path"]) == [
        "celeba-dataset/img_align_celeba/000001.jpg",
        "celeba-dataset/img_align_celeba/000002.jpg",
    ]


def test_celeba_bad_rows_become_rejects(tmp_path, make_celeba):
    make_celeba(tmp_path, [1, 0, 1, 0, 1], partitions=[0, 0, 9, 1, 2])
    attr = tmp_path / ATTR_FILE
    lines = attr.read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 3)[0]  # 000002.jpg: fields missing
    lines.append(lines[1])  # 000001.jpg listed twice
    attr.write_text("\n".join(lines) + "\n")
    cands = read_celeba(tmp_path)
    reasons = dict(cands.rejected)
    img = "img_align_celeba/img_align_celeba"
    assert reasons[f"{ATTR_FILE}:000002.jpg"].startswith("malformed_row:")
    assert reasons[f"{ATTR_FILE}:000001.jpg"] == "duplicate_label_row"
    assert reasons[f"{img}/000003.jpg"].startswith("invalid_partition:")
    assert reasons[f"{img}/000002.jpg"].startswith("missing_label:")  # its only row was bad
    assert list(cands.rows["path"]) == [
        f"{img}/000001.jpg",
        f"{img}/000004.jpg",
        f"{img}/000005.jpg",
    ]


def test_celeba_header_without_male(tmp_path, make_celeba):
    make_celeba(tmp_path, [1])
    attr = tmp_path / ATTR_FILE
    attr.write_text(attr.read_text().replace(",Male,", ",Gender,"))
    with pytest.raises(LayoutError, match="must contain 'image_id' and 'Male'"):
        read_celeba(tmp_path)


def test_celeba_without_images(tmp_path, make_celeba):
    make_celeba(tmp_path, [1])
    for p in (tmp_path / "img_align_celeba" / "img_align_celeba").iterdir():
        p.unlink()
    with pytest.raises(LayoutError, match="image folder"):
        read_celeba(tmp_path)


def test_celeba_bad_partition_header(tmp_path, make_celeba):
    make_celeba(tmp_path, [1], partitions=[0])
    (tmp_path / "list_eval_partition.csv").write_text("image,split\n000001.jpg,0\n")
    with pytest.raises(LayoutError, match="image_id,partition"):
        read_celeba(tmp_path)


def test_celeba_attr_file_not_text(tmp_path, make_celeba):
    make_celeba(tmp_path, [1])
    (tmp_path / ATTR_FILE).write_bytes(b"\xff\xfe\x00\x00garbage")
    with pytest.raises(LayoutError, match="not a readable CSV"):
        read_celeba(tmp_path)


def test_forced_layout_that_does_not_fit(tmp_path, make_image):
    _folders(tmp_path, {"male": 1, "female": 1}, make_image)
    with pytest.raises(LayoutError, match=r"list_attr_celeba\.csv not found"):
        read_layout(tmp_path, "celeba")


def test_forced_class_folders_on_celeba(tmp_path, make_celeba):
    make_celeba(tmp_path, [1])
    with pytest.raises(LayoutError, match="no class folders"):
        read_layout(tmp_path, "class_folders")


# --- unknown -------------------------------------------------------------------------------


def test_unknown_layout_lists_what_was_found(tmp_path, make_image):
    make_image(tmp_path / "photos" / "a.jpg")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "labels.csv").write_text("file,gender\na.jpg,m\n")
    with pytest.raises(LayoutError) as info:
        detect_layout(tmp_path)
    msg = str(info.value)
    assert "unknown dataset layout" in msg
    assert "Found: labels.csv, notes.txt, photos/" in msg
    assert "data.layout" in msg


def test_unknown_layout_empty_folder(tmp_path):
    with pytest.raises(LayoutError, match="Found: an empty folder"):
        read_layout(tmp_path)


def test_celeba_csvs_saved_by_excel_with_a_bom_and_crlf(tmp_path, make_celeba):
    """Attribute and partition files with a UTF-8 byte-order mark and CRLF line ends (as
    Excel saves CSV), and an identity file with CRLF: read exactly like the plain ones."""
    from genderclf.data.celeba import CELEBA_IDENTITY, CELEBA_PARTITION

    make_celeba(tmp_path / "plain", [1, 0, 1, 0], partitions=[0, 1, 2, 0], identities=[5, 6, 7, 5])
    make_celeba(tmp_path / "excel", [1, 0, 1, 0], partitions=[0, 1, 2, 0], identities=[5, 6, 7, 5])
    for name in (ATTR_FILE, CELEBA_PARTITION, CELEBA_IDENTITY):
        f = tmp_path / "excel" / name
        text = f.read_text().replace("\r\n", "\n").replace("\n", "\r\n")
        f.write_bytes(("\ufeff" if name.endswith(".csv") else "").encode() + text.encode())
        assert f.read_bytes().startswith(b"\xef\xbb\xbf" if name.endswith(".csv") else b"000001")
    plain, excel = read_layout(tmp_path / "plain"), read_layout(tmp_path / "excel")
    assert excel.rejected == [] and len(excel.rows) == 4
    assert excel.rows.to_dict("records") == plain.rows.to_dict("records")
    assert list(excel.rows["partition"]) == ["train", "val", "test", "train"]
    assert list(excel.rows["identity"]) == ["5", "6", "7", "5"]
