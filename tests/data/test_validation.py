"""Data tests for the validate stage: every bad file lands in rejected.csv with its reason.

The fixture is a CelebA-format folder with good images plus one file of each bad kind,
and images in modes that must be converted rather than rejected.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from tests.helpers.stages import validate

from genderclf.data.layouts import read_layout
from genderclf.data.sample import ATTR_FILE, CELEBA_ATTRIBUTES, IMAGE_SUBDIR, PARTITION_FILE
from genderclf.data.validation import check_image, check_images
from genderclf.stages.validate import ValidationFailed

IMG = IMAGE_SUBDIR.as_posix()
N_GOOD = 30

# Bad files: name -> expected reason prefix in rejected.csv.
BAD = {
    "000031.jpg": "zero_byte",
    "000032.jpg": "truncated",
    "000033.jpg": "text_file",
    "000034.jpg": "format_mismatch",
    "000035.jpg": "too_small",
    "000036.jpg": "duplicate",  # same bytes as 000001.jpg
    "000037.jpg": "missing_label",  # on disk, no row in list_attr_celeba.csv
    "000038.jpg": "invalid_label",  # Male = 2
    "000039.jpg": "missing_file",  # a row, no file
}
# Images in other modes: converted downstream, so they must be accepted.
CONVERTIBLE = {"000040.jpg": "L", "000041.png": "RGBA", "000042.jpg": "CMYK", "000043.png": "P"}


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory, make_celeba, make_image) -> Path:
    root = tmp_path_factory.mktemp("raw")
    labels = [i % 2 for i in range(N_GOOD)]  # half male
    make_celeba(root, labels)
    img = root / IMAGE_SUBDIR
    (img / "000031.jpg").write_bytes(b"")
    good = make_image(img / "000032.jpg", size=(64, 64), seed=321).read_bytes()
    (img / "000032.jpg").write_bytes(good[: len(good) * 6 // 10])
    (img / "000033.jpg").write_text("image_id,Male\nthis is not a picture\n")
    make_image(img / "000034.jpg", fmt="PNG", seed=34)
    make_image(img / "000035.jpg", size=(20, 24), seed=35)
    shutil.copyfile(img / "000001.jpg", img / "000036.jpg")
    make_image(img / "000037.jpg", seed=37)
    make_image(img / "000038.jpg", seed=38)
    for name, mode in CONVERTIBLE.items():
        fmt = "PNG" if name.endswith(".png") else "JPEG"
        make_image(img / name, mode=mode, fmt=fmt, seed=int(name[:6]))

    listed = [n for n in [*BAD, *CONVERTIBLE] if n != "000037.jpg"]
    with open(root / ATTR_FILE, "a", newline="") as f:
        w = csv.writer(f)
        for name in listed:
            male = "2" if name == "000038.jpg" else "1"
            w.writerow([name, *(male if a == "Male" else "-1" for a in CELEBA_ATTRIBUTES)])
    with open(root / PARTITION_FILE, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "partition"])
        for i in range(N_GOOD):
            w.writerow([f"{i + 1:06d}.jpg", i % 3])
        w.writerows([name, 0] for name in listed)
    return root


def _run(settings, raw_dir: Path, out: Path):
    return validate(settings, raw_dir, out)


def _read_rejected(out: Path) -> dict[str, str]:
    with open(out / "reports" / "validation" / "rejected.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "reason"]
    paths = [r[0] for r in rows[1:]]
    assert len(paths) == len(set(paths)), "a file is rejected twice"
    return {r[0]: r[1] for r in rows[1:]}


@pytest.fixture(scope="module")
def validated(tmp_path_factory, make_settings, raw_dir):
    settings = make_settings({"validate.max_reject_fraction": 0.5})
    out = tmp_path_factory.mktemp("validated")
    summary = _run(settings, raw_dir, out)
    return out, summary


def test_each_bad_file_is_rejected_with_its_reason(validated):
    out, _ = validated
    rejected = _read_rejected(out)
    assert {p.rsplit("/", 1)[1]: r.split(":", 1)[0] for p, r in rejected.items()} == BAD
    assert all(p.startswith(f"{IMG}/") for p in rejected)
    assert rejected[f"{IMG}/000036.jpg"] == f"duplicate: same content as {IMG}/000001.jpg"
    assert "Male='2'" in rejected[f"{IMG}/000038.jpg"]
    assert "PNG data behind a .jpg name" in rejected[f"{IMG}/000034.jpg"]
    assert "20x24" in rejected[f"{IMG}/000035.jpg"]


def test_convertible_modes_are_accepted(validated):
    out, summary = validated
    manifest = pd.read_csv(out / "data" / "validated" / "manifest.csv")
    modes = dict(zip(manifest["path"], manifest["mode"], strict=True))
    for name, mode in CONVERTIBLE.items():
        assert modes[f"{IMG}/{name}"] == mode
    assert summary["converted_modes"] == {m: 1 for m in CONVERTIBLE.values()}


def test_every_file_is_in_exactly_one_of_manifest_and_rejected(validated, raw_dir):
    out, summary = validated
    manifest = pd.read_csv(out / "data" / "validated" / "manifest.csv")
    kept = set(manifest["path"])
    rejected = set(_read_rejected(out))
    on_disk = {p.relative_to(raw_dir).as_posix() for p in (raw_dir / IMAGE_SUBDIR).iterdir()}
    assert kept.isdisjoint(rejected)
    assert kept | rejected == on_disk | {f"{IMG}/000039.jpg"}
    assert len(kept) == N_GOOD + len(CONVERTIBLE)
    assert summary["usable"] == len(kept)
    assert summary["rejected"] == len(rejected) == len(BAD)
    assert summary["files_seen"] == len(kept) + len(rejected)
    assert summary["reject_reasons"] == {reason: 1 for reason in BAD.values()}


def test_manifest_contents(validated, raw_dir):
    out, summary = validated
    manifest = pd.read_csv(out / "data" / "validated" / "manifest.csv", keep_default_na=False)
    assert list(manifest.columns[:4]) == ["path", "label", "partition", "identity"]
    assert set(manifest["label"]) == {0, 1}
    assert set(manifest["partition"]) <= {"train", "val", "test"}
    assert manifest["path"].is_unique
    assert manifest["sha256"].is_unique
    assert set(CELEBA_ATTRIBUTES) <= set(manifest.columns)
    expected_labels = {f"{IMG}/{i + 1:06d}.jpg": i % 2 for i in range(N_GOOD)}
    expected_labels.update({f"{IMG}/{n}": 1 for n in CONVERTIBLE})
    assert dict(zip(manifest["path"], manifest["label"], strict=True)) == expected_labels
    assert summary["male_fraction"] == pytest.approx(manifest["label"].mean(), abs=1e-6)
    assert (manifest["width"] >= 32).all()


def test_reports_are_written(validated):
    out, summary = validated
    reports = out / "reports" / "validation"
    gx = json.loads((reports / "gx_results.json").read_text())
    assert gx["success"] is True
    assert summary["expectations_passed"] is True
    assert len(gx["results"]) >= 8
    docs = list((reports / "data_docs").rglob("index.html"))
    assert docs, "Data Docs not rendered"
    assert json.loads((out / "metrics" / "validation.json").read_text()) == summary


def test_validate_leaves_nothing_in_the_temporary_folder(
    tmp_path, empty_tempdir, make_settings, raw_dir
):
    # GX's ephemeral context builds a docs site of its own in a new temporary folder on every
    # run (4 MB, never removed): 400 of them had piled up on a developer's machine.
    _run(make_settings({"validate.max_reject_fraction": 0.5}), raw_dir, tmp_path / "out")
    assert (tmp_path / "out" / "reports" / "validation" / "data_docs" / "index.html").is_file()
    assert sorted(p.name for p in empty_tempdir.iterdir()) == []


def test_the_report_reads_offline(validated):
    """report.html is self-contained: no script, stylesheet link or URL to fetch, and it
    names every expectation and every rejected file with its reason."""
    out, _ = validated
    html = (out / "reports" / "validation" / "report.html").read_text()
    assert "<script" not in html and "<link" not in html
    assert "http://" not in html and "https://" not in html and "//cdn" not in html
    assert 'expectations <span class="verdict">passed</span>' in html
    gx = json.loads((out / "reports" / "validation" / "gx_results.json").read_text())
    for r in gx["results"]:
        assert r["expectation_config"]["type"] in html
    for path, reason in _read_rejected(out).items():
        assert path in html and reason.split(":")[0] in html


def test_the_data_docs_list_the_result_offline(validated):
    """GX's Data Docs as written: no script, stylesheet or image from a CDN, and the
    index's table of validation results written out (GX fills it with JavaScript from
    CDNs, so offline it listed nothing), linking a result page that exists.
    tests/e2e/test_demo_run.py opens it in Chromium with the network blocked."""
    out, _ = validated
    docs = out / "reports" / "validation" / "data_docs"
    for page in docs.rglob("*.html"):
        html = page.read_text()
        assert not re.search(r"<(script|link|img)[^>]*(src|href)=.https?://", html), page
        assert "<script" not in html and "fa-check-circle" not in html, page
        assert not re.search(r"url\(\s*['\"]?https?://", html), page  # GX's logo, in CSS
    for sheet in docs.rglob("*.css"):
        assert not re.search(r"url\(\s*['\"]?https?://", sheet.read_text()), sheet
    # an output reads like any file the user writes (mkstemp's 0600 is for temporaries)
    assert (out / "reports" / "validation" / "report.html").stat().st_mode & 0o044 == 0o044
    index = (docs / "index.html").read_text()
    table = re.search(r'<table id="[\w-]+" class="ge-offline.*?</table>', index, re.S).group(0)
    assert "<th>Status</th>" in table and "<td>" in table
    (link,) = re.findall(r'href="(validations/[^"]+\.html)">Success</a>', table)
    assert (docs / link).is_file()
    assert "passed" in (docs / link).read_text()


def test_too_many_rejects_fails_without_manifest(tmp_path, make_settings, raw_dir):
    settings = make_settings({"validate.max_reject_fraction": 0.05})
    manifest = tmp_path / "data" / "validated" / "manifest.csv"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("stale manifest from an earlier run\n")
    with pytest.raises(ValidationFailed) as info:
        _run(settings, raw_dir, tmp_path)
    msg = str(info.value)
    assert "exceeds validate.max_reject_fraction=0.05" in msg
    assert f"{len(BAD)} of {N_GOOD + len(CONVERTIBLE) + len(BAD)} files" in msg
    assert not manifest.exists()
    reports = tmp_path / "reports" / "validation"
    assert len(_read_rejected(tmp_path)) == len(BAD)
    assert (reports / "gx_results.json").is_file()
    assert list((reports / "data_docs").rglob("index.html"))


def test_male_fraction_out_of_bounds_fails(tmp_path, make_settings, raw_dir):
    settings = make_settings(
        {
            "validate.max_reject_fraction": 0.5,
            "validate.male_fraction_min": 0.8,
            "validate.male_fraction_max": 1.0,
        }
    )
    with pytest.raises(ValidationFailed, match="expect_column_mean_to_be_between") as info:
        _run(settings, raw_dir, tmp_path)
    assert "max_reject_fraction" not in str(info.value)
    assert not (tmp_path / "data" / "validated" / "manifest.csv").exists()
    gx = json.loads((tmp_path / "reports" / "validation" / "gx_results.json").read_text())
    assert gx["success"] is False
    summary = json.loads((tmp_path / "metrics" / "validation.json").read_text())
    assert summary["expectations_passed"] is False
    assert summary["male_fraction"] < 0.8


def test_too_few_rows_fails(tmp_path, make_settings, raw_dir):
    settings = make_settings({"validate.max_reject_fraction": 0.5, "validate.min_rows": 1000})
    with pytest.raises(ValidationFailed, match="expect_table_row_count_to_be_between"):
        _run(settings, raw_dir, tmp_path)
    assert not (tmp_path / "data" / "validated" / "manifest.csv").exists()


def test_class_folder_dataset(tmp_path, make_settings, make_image):
    raw = tmp_path / "raw"
    for i in range(12):
        make_image(raw / "Training" / ("male" if i % 2 else "female") / f"{i}.jpg", seed=i)
    for i in range(4):
        make_image(raw / "Validation" / ("man" if i % 2 else "woman") / f"v{i}.jpg", seed=100 + i)
    (raw / "Training" / "male" / "broken.jpg").write_bytes(b"")
    settings = make_settings({"validate.min_rows": 10, "validate.max_reject_fraction": 0.1})
    summary = _run(settings, raw, tmp_path)
    assert summary["layout"] == "class_folders"
    assert summary["usable"] == 16
    assert _read_rejected(tmp_path) == {"Training/male/broken.jpg": "zero_byte: empty file"}
    manifest = pd.read_csv(tmp_path / "data" / "validated" / "manifest.csv")
    assert sorted(manifest["partition"].value_counts().items()) == [("train", 12), ("val", 4)]


# --- image checks without the GX suite -----------------------------------------------------


def test_format_mismatch_can_be_allowed(raw_dir):
    path = f"{IMG}/000034.jpg"
    assert check_image(path, str(raw_dir), 32, allow_format_mismatch=False).reason.startswith(
        "format_mismatch"
    )
    ok = check_image(path, str(raw_dir), 32, allow_format_mismatch=True)
    assert ok.ok
    assert ok.format == "PNG"


def test_min_side_comes_from_settings(raw_dir):
    path = f"{IMG}/000035.jpg"  # 20x24
    assert check_image(path, str(raw_dir), 20, False).ok
    assert check_image(path, str(raw_dir), 21, False).reason.startswith("too_small")


def test_check_image_never_raises_on_odd_files(tmp_path):
    cases = {
        "dir.jpg": None,  # a folder with an image name
        "gz.jpg": b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4,  # binary, not an image
        "bomb.png": None,
    }
    (tmp_path / "dir.jpg").mkdir()
    (tmp_path / "gz.jpg").write_bytes(cases["gz.jpg"])
    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, format="PNG")  # 81 Mpx: over MAX_PIXELS
    (tmp_path / "bomb.png").write_bytes(buf.getvalue())
    reasons = {n: check_image(n, str(tmp_path), 32, False).reason.split(":")[0] for n in cases}
    assert reasons == {"dir.jpg": "unreadable", "gz.jpg": "not_an_image", "bomb.png": "too_large"}


def test_parallel_checks_match_serial(raw_dir, make_settings):
    cands = read_layout(raw_dir)
    paths = list(cands.rows["path"]) * 5  # > 128 paths, so two worker processes share them
    assert len(paths) >= 128
    serial = check_images(paths, raw_dir, make_settings({"validate.workers": 1}).validation, False)
    parallel = check_images(
        paths, raw_dir, make_settings({"validate.workers": 2}).validation, False
    )
    assert parallel == serial
    assert [c.path for c in parallel] == paths  # input order kept
