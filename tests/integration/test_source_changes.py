"""`dvc repro` notices new data in a `dir` or `s3` source, and only new data.

The download stage is `always_changed` with a persistent output: DVC runs it on every
`dvc repro`, and it lists the source against the listing in data/raw/SOURCE.json. Run for
real in a temporary git repository (copies of dvc.yaml and src/, tiny params), with the S3
source on a real S3-protocol server (moto) on loopback:

* unchanged source: download runs, data/raw stays byte for byte (so its DVC hash does),
  validate, split and augment are skipped and dvc.lock does not change;
* one image added: the image is in data/raw, the manifest has one row more, the later
  stages run again;
* one image changed (same name, same size, other bytes): noticed, data/raw has the new
  bytes, the stages that read the images run again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml
from tests.helpers import BIN
from tests.helpers.images import write_image
from tests.helpers.servers import s3_client, s3_env
from tests.helpers.servers import s3_server as s3_server_at
from tests.helpers.workspace import copy_pipeline, git_init, pipeline_env, run, write_params

from genderclf import config as C

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DATA_STAGES = ("download", "validate", "split", "augment")
BUCKET = "genderclf-source"


def _ran(output: str) -> set[str]:
    return {s for s in DATA_STAGES if f"Running stage '{s}'" in output}


def _skipped(output: str) -> set[str]:
    return {s for s in DATA_STAGES if f"Stage '{s}' didn't change" in output}


def _digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _images(tmp: Path, n: int) -> dict[str, bytes]:
    """`n` small JPEGs in class folders, half male, half female: {relative path: bytes}."""
    out = {}
    for i in range(n):
        rel = f"{'male' if i % 2 else 'female'}/{i:03d}.jpg"
        out[rel] = write_image(tmp / rel, size=(40, 40), seed=i).read_bytes()
    return out


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    with s3_server_at(BUCKET) as endpoint:
        yield endpoint


def _dir_source(tmp: Path) -> tuple[dict[str, object], Callable[[str, bytes], None]]:
    folder = tmp / "incoming"
    folder.mkdir()

    def put(rel: str, data: bytes) -> None:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)

    return {"data.source": "dir", "data.dir.path": str(folder)}, put


def _s3_source(
    endpoint: str, prefix: str
) -> tuple[dict[str, object], Callable[[str, bytes], None]]:
    client = s3_client(endpoint)

    def put(rel: str, data: bytes) -> None:
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{rel}", Body=data)

    settings = {
        "data.source": "s3",
        "data.s3.uri": f"s3://{BUCKET}/{prefix}",
        "data.s3.endpoint_url": endpoint,
    }
    return settings, put


@pytest.mark.parametrize("source", ["dir", "s3"])
def test_repro_notices_new_and_changed_images_only(source, tmp_path, tiny_params, request):
    from genderclf.config import set_dotted

    if source == "dir":
        overrides, put = _dir_source(tmp_path)
    else:
        overrides, put = _s3_source(request.getfixturevalue("s3_server"), "faces")
    images = _images(tmp_path / "made", 24)
    for rel, data in images.items():
        put(rel, data)

    repo = tmp_path / "repo"
    copy_pipeline(repo)
    params = yaml.safe_load(yaml.safe_dump(tiny_params))
    for k, v in {**overrides, "split.strategy": "stratified", "augment.copies": 0}.items():
        set_dotted(params, k, v)
    write_params(repo, params)
    env = pipeline_env(
        repo,
        drop=("MLFLOW_", "AWS_"),
        **s3_env(),
        AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"),
    )
    git_init(repo, env=env)

    def repro() -> str:
        proc = run(repo, str(BIN / "dvc"), "repro", "augment", env=env)
        return proc.stdout + proc.stderr

    def manifest_rows() -> int:
        return len(pd.read_csv(repo / C.PATHS.manifest))

    first = repro()
    assert _ran(first) == set(DATA_STAGES), first
    assert manifest_rows() == 24

    # 1. unchanged source: download runs and keeps data/raw; nothing after it runs
    raw_before = _digest(repo / C.PATHS.raw)
    lock_before = (repo / "dvc.lock").read_text()
    same = repro()
    assert _ran(same) == {"download"}, same
    assert "files kept, unchanged" in same
    assert _skipped(same) == {"validate", "split", "augment"}, same
    assert _digest(repo / C.PATHS.raw) == raw_before
    assert (repo / "dvc.lock").read_text() == lock_before

    # 2. one image added: fetched, and everything after download runs again
    added = write_image(tmp_path / "new.jpg", size=(40, 40), seed=99).read_bytes()
    put("male/new.jpg", added)
    more = repro()
    assert _ran(more) == set(DATA_STAGES), more
    assert (repo / C.PATHS.raw / "male" / "new.jpg").read_bytes() == added
    assert manifest_rows() == 25
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    raw_out = next(o for o in lock["stages"]["download"]["outs"] if o["path"] == "data/raw")
    assert raw_out["nfiles"] == 25 + 1  # the images and SOURCE.json

    # 3. one image changed in place (same name, same size, other bytes): noticed
    old = bytearray(images["female/000.jpg"])
    old[-3] ^= 0xFF  # inside the JPEG's entropy-coded data: still decodes
    put("female/000.jpg", bytes(old))
    changed = repro()
    assert "download" in _ran(changed) and "validate" in _ran(changed), changed
    assert "augment" in _ran(changed), changed  # it reads the images themselves
    assert (repo / C.PATHS.raw / "female" / "000.jpg").read_bytes() == bytes(old)
    lock_after = yaml.safe_load((repo / "dvc.lock").read_text())
    raw_after = next(o for o in lock_after["stages"]["download"]["outs"])
    assert raw_after["md5"] != raw_out["md5"]
    status = run(repo, str(BIN / "dvc"), "status", env=env).stdout
    assert "always changed" in status  # download, and only download: nothing else is stale
    assert "validate:" not in status and "augment:" not in status
