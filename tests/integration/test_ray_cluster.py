"""The data stages, batch prediction and the by-reference S3 source on a real Ray cluster.

One cluster per session (the `ray_cluster` fixture: a head and a second node, separate
process groups, one CPU each, everything on 127.0.0.1, Ray's token authentication on).
The stages run for real: `dvc repro` in a temporary git repository, `genderclf predict`
against a local S3 server (moto), and every output is compared byte for byte with the
local process pool's:

* the cluster listens on loopback only (`ss -ltnp`, every port of its processes);
* `dvc repro` of validate, split and augment on the cluster: the same bytes as the local
  run, the same dvc.lock, and `dvc status` finds nothing to do when the engine changes;
* the second node killed (SIGKILL to its process group) while it runs an augment task:
  Ray runs the lost tasks again on the head and the shards are still the same bytes;
* `genderclf predict s3://...` through Ray actors, connected as a Ray Client
  (`ray://`, as a driver outside the cluster): the same rows as the local path, and
  neither the S3 secret nor Ray's token in any log of the cluster (the nodes use their
  own credentials);
* the drift profile's per-image work as Ray tasks: the same features, embeddings and
  predictions;
* the by-reference S3 source: data/raw holds a listing, not the images; the stages read
  the objects on the cluster; an object rewritten after the listing stops the stage with
  one line naming its key.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from PIL import Image
from tests.helpers import BIN, REPO_ROOT, uv_run
from tests.helpers.params import pipeline_params
from tests.helpers.ray_cluster import LOOPBACK
from tests.helpers.servers import S3_SECRET, s3_client, s3_env
from tests.helpers.servers import s3_server as s3_server_at
from tests.helpers.workspace import (
    copy_pipeline,
    git_init,
    nothing_stale,
    pipeline_env,
    run,
    write_params,
)

from genderclf import config as C

# a test that waits on the cluster fails after 15 minutes instead of holding CI to its end
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

BUCKET = "genderclf-cluster"
# Enough augment work for the second node to be caught running a task (about 20 chunks
# of 64 images, 4 variants each at 96 px), small enough to stay under a minute a run.
DATA = {
    "data.sample.num_images": 1200,
    "data.sample.workers": 2,
    "base.image_size": 96,
    "augment.copies": 3,
    "augment.shard_size": 256,
    "augment.workers": 2,
    "validate.workers": 2,
    "validate.min_rows": 10,
}
OUTPUTS = (
    "data/validated",
    "data/splits",
    "data/prepared",
    "reports/validation",
    "reports/augment_preview.png",
    "metrics/validation.json",
)


def _outputs(repo: Path) -> dict[str, str]:
    """sha256 of every data-stage output file, reports and Data Docs included."""
    out = {}
    for name in OUTPUTS:
        root = repo / name
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[f.relative_to(repo).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _env(repo: Path, **extra: str) -> dict[str, str]:
    """No MLflow, AWS or Ray settings from this machine; the test S3 credentials."""
    return pipeline_env(
        repo,
        drop=("MLFLOW_", "AWS_", "RAY_"),
        **s3_env(),
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        **extra,
    )


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    with s3_server_at(BUCKET) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> tuple[Path, dict[str, str], str]:
    """A pipeline repository after `dvc repro augment` on the local pool: (repo, digests of
    the outputs, dvc.lock)."""
    repo = tmp_path_factory.mktemp("ray-pipeline") / "repo"
    copy_pipeline(repo)
    write_params(repo, pipeline_params(DATA))
    env = _env(repo)
    git_init(repo, env=env)
    run(repo, str(BIN / "dvc"), "repro", "augment", env=env)
    return repo, _outputs(repo), (repo / "dvc.lock").read_text()


def test_the_cluster_listens_on_loopback_only(ray_cluster):
    ray_cluster.ensure_nodes()
    found = ray_cluster.listening()
    assert len({pid for *_, pid in found}) >= 4, found  # GCS, two raylets, agents, ...
    assert {host for host, *_ in found} <= set(LOOPBACK), found


def test_data_stages_on_the_cluster_give_the_same_bytes(pipeline, ray_cluster):
    repo, local, lock = pipeline
    ray_cluster.ensure_nodes()
    env = _env(repo, **ray_cluster.driver_env())
    # The engine is not a dependency: switching to the cluster re-runs nothing ...
    assert nothing_stale(run(repo, str(BIN / "dvc"), "status", "augment", env=env).stdout)
    # ... and running the stages there gives the same outputs and the same dvc.lock.
    proc = run(repo, str(BIN / "dvc"), "repro", "-f", "-s", "validate", "split", "augment", env=env)
    log = proc.stdout + proc.stderr
    # validate and augment have per-image work (split has none)
    assert log.count(f"engine: Ray cluster at {ray_cluster.address}") == 2, log
    assert _outputs(repo) == local
    assert (repo / "dvc.lock").read_text() == lock


def _node_tasks(cluster, title: str) -> list[str]:
    """Command lines of the second node's processes that run a task named `title`."""
    if cluster.node is None:
        return []
    out = subprocess.run(
        ["ps", "-o", "args=", "-g", str(cluster.node.pid)], capture_output=True, text=True
    ).stdout
    return [line for line in out.splitlines() if line.startswith(f"ray::{title}")]


def test_a_node_killed_during_augment_changes_no_byte(pipeline, ray_cluster):
    repo, local, _ = pipeline
    ray_cluster.ensure_nodes()
    env = _env(repo, **ray_cluster.driver_env())
    proc = subprocess.Popen(
        [str(BIN / "genderclf"), "augment", "-q"],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    busy: list[str] = []
    deadline = time.monotonic() + 300
    while not busy and proc.poll() is None and time.monotonic() < deadline:
        busy = _node_tasks(ray_cluster, "augment._process")
        time.sleep(0.02)
    assert busy, "the second node ran no augment task (or augment ended first)"
    ray_cluster.kill_node()  # mid-task: its result never reaches the driver
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert _outputs(repo) == local
    assert nothing_stale(run(repo, str(BIN / "dvc"), "status", "augment", env=env).stdout)


# --- predict ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, make_settings) -> Path:
    """An untrained small CNN (rows are compared, not judged)."""
    import keras

    from genderclf.model.backbones import build_model

    keras.utils.set_random_seed(5)
    model = build_model(make_settings({"train.backbone": "simple_cnn"}).train, 48)
    path = tmp_path_factory.mktemp("ray-model") / "model.keras"
    model.save(path)
    return path


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_predict_on_an_s3_prefix_through_actors_gives_the_local_rows(
    tmp_path, s3_server, model_file, ray_cluster
):
    from genderclf.data.sample import render

    client = s3_client(s3_server)
    for i in range(10):
        out = render(11, i, i // 2, 0.5, 0.0)
        face = out[0] if isinstance(out, tuple) else out
        client.put_object(Bucket=BUCKET, Key=f"batch/{i:02d}.jpg", Body=_jpeg(face))
    client.put_object(Bucket=BUCKET, Key="batch/broken.jpg", Body=b"not a picture")
    client.put_object(Bucket=BUCKET, Key="batch/notes.txt", Body=b"left out")
    params = tmp_path / "params.yaml"
    raw = pipeline_params({"data.s3.endpoint_url": s3_server})
    params.write_text(yaml.safe_dump(raw))
    args = [str(BIN / "genderclf"), "predict", f"s3://{BUCKET}/batch", "-m", str(model_file)]
    args += ["--params", str(params), "-f", "jsonl", "-q"]
    local = run(tmp_path, *args, env=_env(tmp_path), check=False)
    ray_cluster.ensure_nodes()
    client = ray_cluster.driver_env(client=True)  # a driver outside the cluster: Ray Client
    cluster = run(tmp_path, *args, env=_env(tmp_path, **client), check=False)
    assert local.returncode == cluster.returncode == 1, cluster.stderr[-3000:]  # broken.jpg
    assert f"engine: Ray cluster at {client['RAY_ADDRESS']}" in cluster.stderr
    rows = local.stdout.splitlines()
    assert len(rows) >= 11 and f"s3://{BUCKET}/batch/broken.jpg" in local.stdout
    assert cluster.stdout == local.stdout, cluster.stderr[-3000:]
    assert "1 non-image files in the folders left out" in cluster.stderr
    # The nodes read S3 with their own credentials; no log of the cluster holds them, nor
    # the cluster's token.
    secrets = (S3_SECRET.encode(), ray_cluster.env["RAY_AUTH_TOKEN"].encode())
    logs = [p for p in (ray_cluster.root / "tmp").rglob("*") if p.is_file()]
    assert not [p for p in logs if any(s in p.read_bytes() for s in secrets)]


# The cluster's half of the drift test, in a fresh interpreter as `genderclf drift` would
# be (a Ray driver inside pytest's process inherits whatever an earlier test left of Ray).
PROFILE_ON_THE_CLUSTER = """
import pickle, sys
from pathlib import Path
import ray
from genderclf.inference import ServingConfig, load_local
from genderclf.monitor.batch import sources
from genderclf.monitor.profile import profile

model, endpoint, out, *names = sys.argv[1:]
clf = load_local(Path(model), config=ServingConfig(48, "center_crop", 0.5))
result = profile(sources("s3://%s/drift", names, endpoint, 0), clf, 50_000_000, 8)
assert ray.is_initialized()  # it did run as Ray tasks
Path(out).write_bytes(pickle.dumps(result))
"""


def test_the_drift_profile_is_the_same_on_the_cluster(
    tmp_path, s3_server, model_file, ray_cluster, monkeypatch
):
    import numpy as np

    from genderclf.data.sample import render
    from genderclf.inference import ServingConfig, load_local
    from genderclf.monitor.batch import sources
    from genderclf.monitor.profile import profile

    client = s3_client(s3_server)
    names = []
    for i in range(24):
        out = render(13, i, i // 3, 0.5, 0.0)
        client.put_object(
            Bucket=BUCKET,
            Key=f"drift/{i:02d}.jpg",
            Body=_jpeg(out[0] if isinstance(out, tuple) else out),
        )
        names.append(f"{i:02d}.jpg")
    names.append("missing.jpg")  # unreadable: listed in `failed` on both engines
    for k, v in s3_env().items():
        monkeypatch.setenv(k, v)
    clf = load_local(model_file, config=ServingConfig(48, "center_crop", 0.5))

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    here = profile(sources(f"s3://{BUCKET}/drift", names, s3_server, 0), clf, 50_000_000, 8)
    ray_cluster.ensure_nodes()
    # As a user runs it: `uv run` from the checkout. Ray's own `uv run` hook would then
    # rebuild the checkout's project on the nodes, without Ray (genderclf.engine.import_ray
    # turns it off); CI's `make test-slow` failed on exactly this.
    env = _env(tmp_path, **ray_cluster.driver_env())
    env.pop("PYTHONPATH")  # the checkout's own package, as `uv run` gives it
    result = tmp_path / "there.pkl"
    script = PROFILE_ON_THE_CLUSTER % BUCKET
    args = [*uv_run(), "python", "-c", script, str(model_file), s3_server, str(result), *names]
    proc = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    there = pickle.loads(result.read_bytes())
    assert there.names == here.names and len(here) == 24
    assert there.failed == here.failed and here.failed[0][0] == "missing.jpg"
    for field in ("features", "embeddings", "p_male", "male"):
        assert np.array_equal(getattr(there, field), getattr(here, field)), field


# --- the S3 source by reference --------------------------------------------------------------


def test_s3_source_by_reference_runs_on_the_cluster_and_refuses_a_changed_object(
    tmp_path, s3_server, ray_cluster
):
    from tests.helpers.images import write_image

    client = s3_client(s3_server)
    sent: dict[str, bytes] = {}
    for i in range(36):
        rel = f"{'male' if i % 3 == 0 else 'female'}/{i:03d}.jpg"
        data = write_image(tmp_path / "made" / rel, size=(40, 40), seed=i).read_bytes()
        client.put_object(Bucket=BUCKET, Key=f"faces/{rel}", Body=data)
        sent[rel] = data
    repo = tmp_path / "repo"
    copy_pipeline(repo)
    overrides = {
        "data.source": "s3",
        "data.s3.uri": f"s3://{BUCKET}/faces",
        "data.s3.mode": "reference",
        "data.s3.endpoint_url": s3_server,
        "split.strategy": "stratified",
        "augment.copies": 0,
    }
    write_params(repo, pipeline_params(overrides))
    ray_cluster.ensure_nodes()
    env = _env(repo, **ray_cluster.driver_env())
    git_init(repo, env=env)
    run(repo, str(BIN / "dvc"), "repro", "augment", env=env)

    raw = sorted(
        p.relative_to(repo / C.PATHS.raw).as_posix() for p in (repo / "data/raw").iterdir()
    )
    assert raw == ["LISTING.csv", "SOURCE.json"]  # a pinned listing, no image copied
    listing = (repo / C.PATHS.raw / "LISTING.csv").read_text().splitlines()
    assert listing[0] == "key,size,etag,version_id" and len(listing) == 37
    manifest = (repo / C.PATHS.manifest).read_text().splitlines()
    header = manifest[0].split(",")
    digests = {
        r.split(",")[0]: r.split(",")[header.index("sha256")] for r in manifest[1:]
    }  # the bytes the cluster read are the bytes in the bucket
    assert digests == {k: hashlib.sha256(v).hexdigest() for k, v in sent.items()}
    meta = yaml.safe_load((repo / C.PATHS.prepared / "meta.json").read_text())
    assert sum(s["records"] for s in meta["splits"].values()) == 36

    # Rewritten after the listing: the stage stops, naming the key; nothing is read silently.
    changed = write_image(tmp_path / "other.jpg", size=(40, 40), seed=999).read_bytes()
    client.put_object(Bucket=BUCKET, Key="faces/male/000.jpg", Body=changed)
    failed = run(repo, str(BIN / "genderclf"), "augment", "-q", env=env, check=False)
    assert failed.returncode == 1
    assert "s3://genderclf-cluster/faces/male/000.jpg changed since" in failed.stderr
    assert "Traceback" not in failed.stderr
    # Download lists the source again: the change becomes a new dataset version (the next
    # `dvc repro` runs the stages after it on the new listing).
    run(repo, str(BIN / "genderclf"), "download", "-q", env=env)
    relisted = (repo / C.PATHS.raw / "LISTING.csv").read_text()
    assert f"male/000.jpg,{len(changed)},{hashlib.md5(changed).hexdigest()}," in relisted
    assert nothing_stale(run(repo, str(BIN / "dvc"), "status", "download", env=env).stdout)
    status = run(repo, str(BIN / "dvc"), "status", "validate", env=env).stdout
    assert "modified:           data/raw" in status, status
