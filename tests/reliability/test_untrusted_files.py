"""Untrusted files: hostile archives are refused whole, unsafe or broken models are refused.

Archives come from the network (Kaggle, object storage); a model file comes from disk or
the registry. Neither may write outside its folder or run code it carries.
"""

from __future__ import annotations

import os
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest
from tests.helpers import BIN
from tests.helpers.archives import make_tar as _tar
from tests.helpers.archives import make_zip as _zip
from tests.helpers.archives import tar_link as _link
from tests.helpers.stages import download

from genderclf.config import SOURCE_NAME
from genderclf.data import sources
from genderclf.io import UnsafeArchiveError, safe_extract
from genderclf.model.saving import ModelLoadError, load_model

GOOD = [("data/a.txt", b"a"), ("data/sub/b.txt", b"b")]


# Each hostile archive puts good members first, so a refusal after writing them would show.
HOSTILE = {
    "zip-absolute": lambda p: _zip(p / "a.zip", [*GOOD, ("/tmp/evil.txt", b"x")]),
    "zip-dotdot": lambda p: _zip(p / "a.zip", [*GOOD, ("data/../../evil.txt", b"x")]),
    "zip-backslash-dotdot": lambda p: _zip(p / "a.zip", [*GOOD, ("..\\evil.txt", b"x")]),
    "zip-symlink-out": lambda p: _zip(p / "a.zip", GOOD, symlink=("data/evil", "../../..")),
    "tar-absolute": lambda p: _tar(p / "a.tgz", [*GOOD, ("/tmp/evil.txt", b"x")]),
    "tar-dotdot": lambda p: _tar(p / "a.tgz", [*GOOD, ("../evil.txt", b"x")]),
    "tar-symlink-absolute": lambda p: _tar(p / "a.tgz", [*GOOD, _link("data/e", "/etc")]),
    "tar-symlink-up": lambda p: _tar(p / "a.tgz", [*GOOD, _link("data/e", "../../x")]),
    # a link inside that points at a link going out: each is checked on its own
    "tar-symlink-chain": lambda p: _tar(
        p / "a.tgz", [*GOOD, _link("data/in", "sub"), _link("data/sub/out", "../../..")]
    ),
    "tar-hardlink-out": lambda p: _tar(
        p / "a.tgz", [*GOOD, _link("data/h", "../x", tarfile.LNKTYPE)]
    ),
    "tar-device": lambda p: _tar(p / "a.tgz", [*GOOD, _link("data/dev", "", tarfile.CHRTYPE)]),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_archive_is_refused_and_leaves_nothing(tmp_path, kind):
    archive = HOSTILE[kind](tmp_path)
    target = tmp_path / "out" / "target"
    with pytest.raises(UnsafeArchiveError):
        safe_extract(archive, target)
    assert not target.exists()  # not even the folder, and no good member
    assert [p.name for p in tmp_path.iterdir()] == [archive.name]  # not even its parent
    assert not Path("/tmp/evil.txt").exists()


def test_refused_archive_keeps_an_existing_target_as_it_was(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(UnsafeArchiveError):
        safe_extract(HOSTILE["tar-dotdot"](tmp_path), target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_corrupt_archive_fails_and_removes_what_it_wrote(tmp_path):
    archive = _zip(tmp_path / "c.zip", [*GOOD, ("data/big.txt", b"y" * 10_000)])
    raw = bytearray(archive.read_bytes())
    i = raw.index(b"y" * 100)  # stored uncompressed: flip data bytes, the CRC no longer matches
    raw[i : i + 100] = b"z" * 100
    archive.write_bytes(bytes(raw))
    target = tmp_path / "target"
    with pytest.raises(zipfile.BadZipFile):
        safe_extract(archive, target)
    assert not target.exists()


@pytest.mark.parametrize("kind", ["zip-dotdot", "tar-symlink-absolute"])
def test_hostile_download_keeps_the_previous_dataset(tmp_path, make_settings, monkeypatch, kind):
    """Through the download stage (Kaggle source, the client replaced by a hostile archive)."""
    raw = tmp_path / "data" / "raw"
    download(make_settings(), raw, progress=False)  # a previous, complete dataset
    before = {p.relative_to(raw): p.read_bytes() for p in raw.rglob("*") if p.is_file()}
    archive = HOSTILE[kind](tmp_path)

    def hostile_client(slug: str, dest: Path) -> Path:
        out = dest / archive.name
        out.write_bytes(archive.read_bytes())
        return out

    monkeypatch.setattr(sources, "_kaggle_download", hostile_client)
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "0123456789abcdef")
    with pytest.raises(UnsafeArchiveError):
        download(make_settings({"data.source": "kaggle"}), raw, progress=False)
    after = {p.relative_to(raw): p.read_bytes() for p in raw.rglob("*") if p.is_file()}
    assert after == before and Path(SOURCE_NAME) in after
    assert sorted(p.name for p in raw.parent.iterdir()) == ["raw"]  # no temp folder left


# --- models --------------------------------------------------------------------------------


def _lambda_model(path: Path, marker: Path) -> None:
    import keras

    # A Python lambda is saved as bytecode: the "code in the file". It writes `marker`
    # whenever it runs (once here, when the layer is built).
    payload = eval(
        f"lambda x: (__import__('pathlib').Path({str(marker)!r}).write_text('ran'), x)[1]"
    )
    inp = keras.Input((4,))
    keras.Model(inp, keras.layers.Lambda(payload)(inp)).save(str(path))
    assert marker.exists()
    marker.unlink()


def test_a_model_that_carries_code_is_refused_without_running_it(tmp_path):
    import keras
    from keras.src.backend.common import global_state

    path, marker = tmp_path / "model.keras", tmp_path / "payload-ran"
    _lambda_model(path, marker)
    with pytest.raises(ModelLoadError, match=r"model\.keras was refused.*safe mode") as err:
        load_model(path)
    assert "Traceback" not in str(err.value)
    assert not marker.exists()
    # Safe mode stays on for our loader even when something turned it off process-wide.
    before = global_state.get_global_attribute("safe_mode_saving")
    keras.config.enable_unsafe_deserialization()
    try:
        with pytest.raises(ModelLoadError, match="safe mode"):
            load_model(path)
    finally:
        global_state.set_global_attribute("safe_mode_saving", before)
    assert not marker.exists()


def _truncated(path: Path) -> None:
    import keras

    inp = keras.Input((4,))
    keras.Model(inp, keras.layers.Dense(1)(inp)).save(str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda p: p.write_bytes(b""), id="empty"),
        pytest.param(lambda p: p.write_text("not a model"), id="text"),
        pytest.param(lambda p: p.write_bytes(os.urandom(4096)), id="random-bytes"),
        pytest.param(lambda p: _zip(p, [("hello.txt", b"hi")]), id="zip-not-a-model"),
        pytest.param(lambda p: _zip(p, [("config.json", b"{not json")]), id="bad-config"),
        pytest.param(_truncated, id="truncated-model"),
    ],
)
def test_a_file_that_is_not_a_model_gives_a_clear_error(tmp_path, make):
    path = tmp_path / "model.keras"
    make(path)
    with pytest.raises(ModelLoadError, match=rf"^{path} is not a loadable Keras model"):
        load_model(path)


def test_evaluate_cli_on_a_file_that_is_not_a_model_is_one_line(tmp_path, model_settings, prepared):
    """Everything evaluate reads is in place (params, prepared data, the train stage's
    model.json naming this file) except the model file itself, which is not a model."""
    import yaml

    from genderclf.contracts import ModelInput, TrainedModel
    from genderclf.io import md5_file

    settings = model_settings()
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump(settings.model_dump(by_alias=True), sort_keys=False)
    )
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prepared").symlink_to(prepared, target_is_directory=True)
    (tmp_path / "models").mkdir()
    model = tmp_path / "models" / "model.keras"
    model.write_bytes(b"PK\x03\x04 truncated zip header")
    TrainedModel(
        input=ModelInput(settings.base.image_size, settings.augment.resize),
        model_md5=md5_file(model),
        seed=settings.base.seed,
        train=settings.train.model_dump(),
    ).write(tmp_path / "models" / "model.json")
    proc = subprocess.run(
        [str(BIN / "genderclf"), "evaluate"],
        cwd=tmp_path,
        text=True,
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "error (evaluate): models/model.keras is not a loadable Keras model" in proc.stderr
