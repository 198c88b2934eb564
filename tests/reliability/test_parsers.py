"""Property-based tests of the parsers that read files a person or a download wrote.

`params.yaml`, CelebA's attribute CSV, partition and identity files are fed random and
malformed values; the only outcomes allowed are a valid result or the parser's own
error (SettingsError, LayoutError) naming the problem, never a library traceback.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from tests.helpers.images import write_celeba

from genderclf.config import Settings, SettingsError, load_settings, set_dotted
from genderclf.data import sample
from genderclf.data.layouts import Candidates, LayoutError, read_celeba, read_layout

FAST = hsettings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _leaves(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix


@pytest.fixture(scope="module")
def params_keys(real_params) -> list[str]:
    return sorted(_leaves(real_params))


# --- params.yaml ---------------------------------------------------------------------------

_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "",
            "0",
            "-1",
            "1e309",
            "nan",
            ".inf",
            "yes",
            "off",
            "s3://",
            "~",
            "imagenet",
            "vgg16",
            "2024-13-45",
            "0x10",
            "1_000",
        ]
    ),
    st.lists(st.integers() | st.text(max_size=4), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@FAST
@given(data=st.data())
def test_params_with_one_bad_value_load_or_name_the_key(
    tmp_path_factory, real_params, params_keys, data
):
    key = data.draw(st.sampled_from(params_keys), label="key")
    value = data.draw(_values, label="value")
    raw = yaml.safe_load(yaml.safe_dump(real_params))
    set_dotted(raw, key, value)
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    try:
        s = load_settings(path)
    except SettingsError as err:
        message = str(err)
        assert message.startswith(str(path))
        assert key in message, message  # names the key, e.g. `train.lr_head: ...`
    else:
        assert isinstance(s, Settings)


_yaml_noise = st.sampled_from(
    [
        "{",
        "[",
        ": :",
        "- - -",
        "\t",
        "!!python/object:os.system ls",
        "&a [*a]",
        "? x",
        "%YAML 9.9",
        "\x00",
        "'",
        '"',
        "base: {seed: [}",
        "*undefined",
        "!!binary 4",
        "---\n---",
    ]
)


@FAST
@given(prefix=st.text(max_size=30), noise=_yaml_noise, suffix=st.text(max_size=30))
def test_malformed_params_file_is_a_settings_error(
    tmp_path_factory, real_params, prefix, noise, suffix
):
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    text = yaml.safe_dump(real_params)
    cut = len(prefix) % len(text)
    path.write_text(text[:cut] + prefix + noise + suffix + text[cut:], encoding="utf-8")
    try:
        s = load_settings(path)
    except SettingsError as err:
        assert str(path) in str(err)
    else:
        assert isinstance(s, Settings)


@FAST
@given(blob=st.binary(max_size=200))
def test_binary_params_file_is_a_settings_error(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_bytes(blob)
    try:
        load_settings(path)
    except SettingsError as err:
        assert str(path) in str(err)


# --- CelebA attribute, partition and identity files ------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A CelebA image folder with 4 images, shared (by symlink) by every example."""
    root = tmp_path_factory.mktemp("celeba")
    write_celeba(root, [1, 0, 1, 0])
    return root / sample.IMAGE_SUBDIR.parts[0]


def _dataset(images: Path, files: dict[str, bytes]) -> Path:
    root = Path(tempfile.mkdtemp(prefix="celeba-"))
    (root / images.name).symlink_to(images, target_is_directory=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


def _check(images: Path, files: dict[str, bytes], culprit: str) -> None:
    root = _dataset(images, files)
    try:
        got = read_celeba(root)
    except LayoutError as err:
        assert culprit in str(err) or sample.ATTR_FILE in str(err), str(err)
    else:
        assert isinstance(got, Candidates)
        # Every image on disk is either a candidate row or a reject with a reason.
        names = {Path(p).name for p in got.rows["path"]}
        rejected = {Path(p.split(":")[0]).name for p, _ in got.rejected} | {
            p.split(":")[-1] for p, _ in got.rejected
        }
        on_disk = {f"{i:06d}.jpg" for i in range(1, 5)}
        assert on_disk <= names | rejected
        assert set(got.rows["label"].astype(int)) <= {0, 1}
        assert set(got.rows["partition"]) <= {"", "train", "val", "test"}
        assert all(reason for _, reason in got.rejected)
    finally:
        shutil.rmtree(root)


_cells = st.sampled_from(
    [
        "1",
        "-1",
        "0",
        "",
        " 1",
        "1 ",
        "x",
        "nan",
        "000001.jpg",
        "000002.jpg",
        "000003.jpg",
        "000004.jpg",
        "000009.jpg",
        "../x.jpg",
        '"',
        "a,b",
        "é",
    ]
)
_header = st.one_of(
    st.just(["image_id", *sample.CELEBA_ATTRIBUTES]),
    st.just(["image_id", "Male"]),
    st.lists(st.sampled_from(["image_id", "Male", "Young", "", "id", " Male "]), max_size=4),
)


def _csv(header: list[str], rows: list[list[str]]) -> bytes:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode()


@FAST
@given(
    header=_header,
    rows=st.lists(st.lists(_cells, max_size=6), max_size=8),
    raw=st.none() | st.binary(max_size=120) | st.text(max_size=120).map(str.encode),
)
def test_attribute_csv_gives_candidates_or_layout_error(images, header, rows, raw):
    data = raw if raw is not None else _csv(header, rows)
    _check(images, {sample.ATTR_FILE: data}, sample.ATTR_FILE)


@FAST
@given(
    rows=st.lists(
        st.lists(_cells | st.sampled_from(["2", "3", "-0", "1.0"]), max_size=3), max_size=8
    ),
    header=st.sampled_from([["image_id", "partition"], ["image_id"], ["partition"], []]),
    raw=st.none() | st.binary(max_size=80),
)
def test_partition_file_gives_candidates_or_layout_error(images, rows, header, raw):
    attrs = _csv(
        ["image_id", "Male"], [[f"{i:06d}.jpg", "1" if i % 2 else "-1"] for i in range(1, 5)]
    )
    data = raw if raw is not None else _csv(header, rows)
    _check(images, {sample.ATTR_FILE: attrs, sample.PARTITION_FILE: data}, sample.PARTITION_FILE)


@FAST
@given(blob=st.binary(max_size=120) | st.text(max_size=120).map(str.encode))
def test_identity_file_gives_candidates_or_layout_error(images, blob):
    attrs = _csv(["image_id", "Male"], [[f"{i:06d}.jpg", "1"] for i in range(1, 5)])
    _check(images, {sample.ATTR_FILE: attrs, sample.IDENTITY_FILE: blob}, sample.IDENTITY_FILE)


def test_read_layout_on_a_folder_of_garbage_names_the_problem(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(LayoutError, match="unknown dataset layout"):
        read_layout(tmp_path)
