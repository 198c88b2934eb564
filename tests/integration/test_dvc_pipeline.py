"""The data stages through the real `dvc repro`, in a temporary git repository.

The repository gets copies of dvc.yaml, .dvc/config, .dvcignore, .gitignore and src/, and
a params.yaml shrunk from the real one, so DVC hashes and runs exactly the project's code.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml
from tests.helpers import BIN
from tests.helpers.workspace import copy_pipeline, git_init
from tests.helpers.workspace import dvc as _dvc
from tests.helpers.workspace import run as _run
from tests.helpers.workspace import write_params as _write_params

from genderclf import config as C

pytestmark = pytest.mark.integration

DATA_STAGES = ("download", "validate", "split", "augment")


def _ran(output: str) -> set[str]:
    return {s for s in DATA_STAGES if f"Running stage '{s}'" in output}


def _skipped(output: str) -> set[str]:
    return {s for s in DATA_STAGES if f"Stage '{s}' didn't change" in output}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_params) -> tuple[Path, dict, subprocess.CompletedProcess[str]]:
    """A git repo with the pipeline, after a first `dvc repro augment`."""
    repo = tmp_path_factory.mktemp("pipeline") / "repo"
    copy_pipeline(repo)
    params = dict(tiny_params)
    _write_params(repo, params)
    git_init(repo)
    first = _dvc(repo, "repro", "augment")
    return repo, params, first


def test_first_run_writes_every_contracted_output(pipeline):
    repo, params, first = pipeline
    assert _ran(first.stdout) == set(DATA_STAGES)
    n = params["data"]["sample"]["num_images"]

    source = yaml.safe_load((repo / C.PATHS.source_file).read_text())  # JSON is YAML
    assert source["source"] == "sample"
    assert source["file_count"] == n + 3

    manifest = pd.read_csv(repo / C.PATHS.manifest)
    assert len(manifest) == n  # the sample has no bad files
    assert set(manifest["label"]) == {0, 1}
    rejected = (repo / C.PATHS.rejected).read_text().splitlines()
    assert rejected == ["path,reason"]
    assert (repo / C.PATHS.validation / "gx_results.json").is_file()
    assert list((repo / C.PATHS.validation / "data_docs").rglob("index.html"))
    metrics = yaml.safe_load((repo / C.PATHS.validation_metrics).read_text())
    assert metrics["usable"] == n
    assert metrics["expectations_passed"] is True

    splits = {s: pd.read_csv(repo / C.PATHS.splits / f"{s}.csv") for s in C.SPLITS}
    assert sum(len(df) for df in splits.values()) == n
    assert all(len(df) > 0 for df in splits.values())

    meta = yaml.safe_load((repo / C.PATHS.prepared / "meta.json").read_text())
    assert meta["image_size"] == params["base"]["image_size"]
    copies = params["augment"]["copies"]
    for s, df in splits.items():
        assert meta["splits"][s]["records"] == len(df) * (1 + copies if s == "train" else 1)
        for shard in meta["splits"][s]["shards"]:
            assert (repo / C.PATHS.prepared / shard).stat().st_size > 0
    assert (repo / C.PATHS.augment_preview).stat().st_size > 0

    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(DATA_STAGES)
    assert lock["stages"]["augment"]["params"]["params.yaml"]["augment.copies"] == copies
    # DVC owns the data: git ignores the outputs
    ignored = _run(repo, "git", "check-ignore", "data/raw", "data/prepared").stdout.split()
    assert ignored == ["data/raw", "data/prepared"]


def test_second_run_is_a_no_op(pipeline):
    repo, _, _ = pipeline
    lock_before = (repo / "dvc.lock").read_text()
    meta_before = (repo / C.PATHS.prepared / "meta.json").read_bytes()
    raw_before = {p: p.read_bytes() for p in (repo / C.PATHS.raw).rglob("*") if p.is_file()}
    again = _dvc(repo, "repro", "augment")
    # download always runs (`always_changed`): it lists the source, finds it unchanged and
    # keeps data/raw, so DVC finds the same hash and skips everything after it
    assert _ran(again.stdout) == {"download"}
    assert "files kept, unchanged" in again.stdout
    assert _skipped(again.stdout) == set(DATA_STAGES) - {"download"}
    assert (repo / "dvc.lock").read_text() == lock_before
    assert (repo / C.PATHS.prepared / "meta.json").read_bytes() == meta_before
    after = {p: p.read_bytes() for p in (repo / C.PATHS.raw).rglob("*") if p.is_file()}
    assert after == raw_before
    # later stages (train, ...) have not run; of the data stages only download is listed
    status = _dvc(repo, "status", "--with-deps", "augment").stdout
    assert "download:" in status and "always changed" in status
    for stage in ("validate", "split", "augment"):
        assert f"{stage}:" not in status


def test_changing_copies_reruns_only_augment(pipeline):
    repo, params, _ = pipeline
    copies = params["augment"]["copies"] + 1
    changed = {**params, "augment": {**params["augment"], "copies": copies}}
    _write_params(repo, changed)
    status = _dvc(repo, "status", "--with-deps", "augment").stdout
    assert "augment" in status
    assert "params.yaml" in status
    for stage in ("validate", "split"):
        assert f"{stage}:" not in status

    run = _dvc(repo, "repro", "augment")
    assert _ran(run.stdout) == {"download", "augment"}  # download: always, a no-op here
    assert _skipped(run.stdout) == {"validate", "split"}
    meta = yaml.safe_load((repo / C.PATHS.prepared / "meta.json").read_text())
    n_train = len(pd.read_csv(repo / C.PATHS.splits / "train.csv"))
    assert meta["splits"]["train"]["records"] == n_train * (1 + copies)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["augment"]["params"]["params.yaml"]["augment.copies"] == copies

    # A bad value: the run fails at start, naming the key, and dvc.lock keeps the last
    # good run, whose cached outputs `dvc checkout` brings back (DVC removes a stage's
    # outputs before running it).
    meta_before = (repo / C.PATHS.prepared / "meta.json").read_bytes()
    lock_before = (repo / "dvc.lock").read_text()
    _write_params(repo, {**params, "augment": {**params["augment"], "copies": -1}})
    failed = _dvc(repo, "repro", "augment", check=False)
    assert failed.returncode != 0
    output = failed.stdout + failed.stderr
    # every stage loads all of params.yaml, so download (which always runs) is the first to fail
    assert "failed to reproduce 'download'" in output
    assert "augment.copies: Input should be greater than or equal to 0" in output
    assert "Traceback" not in output
    assert (repo / "dvc.lock").read_text() == lock_before
    _write_params(repo, changed)
    _dvc(repo, "checkout", *DATA_STAGES)
    assert (repo / C.PATHS.prepared / "meta.json").read_bytes() == meta_before


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ("augment:\n  copys: 2\n", "augment.copys"),
        ("validate:\n  min_side: big\n", "validate.min_side"),
        ("data:\n  source: ftp\n", "data.source"),
        ("base: [unclosed\n", "not valid YAML"),
    ],
)
def test_cli_bad_params_exit_1_without_traceback(tmp_path, content, named):
    bad = tmp_path / "params.yaml"
    bad.write_text(content)
    proc = _run(tmp_path, str(BIN / "genderclf"), "download", "--params", str(bad), check=False)
    assert proc.returncode == 1
    assert named in proc.stderr
    assert str(bad) in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "data").exists()
