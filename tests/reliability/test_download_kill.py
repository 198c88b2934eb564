"""`genderclf download` killed with SIGKILL mid-way: `data/raw/` is the previous complete
dataset or absent, never partial; the next run completes and clears the leftovers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from tests.helpers import BIN

from genderclf.config import SOURCE_NAME
from genderclf.io import tree_checksum

pytestmark = pytest.mark.integration


def _params(work: Path, tiny_params: dict, num_images: int) -> None:
    params = yaml.safe_load(yaml.safe_dump(tiny_params))
    params["data"]["sample"].update(num_images=num_images, workers=1)
    (work / "params.yaml").write_text(yaml.safe_dump(params))


def _download(work: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN / "genderclf"), "download", "--quiet"],
        cwd=work,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _kill_mid_way(work: Path, at_least: int = 20, timeout: float = 240) -> None:
    """Start a download and SIGKILL it once its temporary folder holds `at_least` images."""
    proc = _download(work)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        temps = list((work / "data").glob(".raw.tmp-*"))
        if temps and sum(1 for _ in temps[0].rglob("*.jpg")) >= at_least:
            break
        if proc.poll() is not None:
            raise AssertionError(f"download ended before it was killed: {proc.communicate()}")
        time.sleep(0.02)
    else:
        proc.kill()
        raise AssertionError("the download never got going")
    os.kill(proc.pid, signal.SIGKILL)  # no cleanup handlers run: as an OOM kill
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL


def _complete(raw: Path) -> bool:
    """SOURCE.json is written last, with a checksum over every other file."""
    record = json.loads((raw / SOURCE_NAME).read_text())
    checksum, count = tree_checksum(raw, exclude=(SOURCE_NAME,))
    return record["checksum"] == f"sha256:{checksum}" and record["file_count"] == count


def test_killed_download_leaves_the_previous_dataset_or_nothing(tmp_path, tiny_params):
    work = tmp_path / "work"
    work.mkdir()
    raw = work / "data" / "raw"

    # 1. the very first download is killed: no data/raw at all, only a temp folder
    _params(work, tiny_params, 2000)
    _kill_mid_way(work)
    assert not raw.exists()
    assert list((work / "data").glob(".raw.tmp-*"))  # what the kill left behind

    # 2. a complete download, then a bigger one killed mid-way: the first stays whole
    _params(work, tiny_params, 40)
    assert _download(work).wait(240) == 0
    assert _complete(raw)
    before = {p.relative_to(raw): p.read_bytes() for p in raw.rglob("*") if p.is_file()}
    _params(work, tiny_params, 2000)
    _kill_mid_way(work)
    after = {p.relative_to(raw): p.read_bytes() for p in raw.rglob("*") if p.is_file()}
    assert after == before and _complete(raw)

    # 3. the next run completes and removes what the killed runs left
    _params(work, tiny_params, 200)
    proc = _download(work)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, out + err
    assert _complete(raw)
    assert json.loads((raw / SOURCE_NAME).read_text())["num_images"] == 200
    assert sorted(p.name for p in (work / "data").iterdir()) == ["raw"]
