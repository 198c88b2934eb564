"""The CPU image, built and run: exactly uv.lock as a non-root user, and the whole pipeline
(`dvc repro` through the image's entry point) over a mounted git clone.

Built with docker/Dockerfile on the local base image (docker/base/build.sh); every container
runs on the host's network (tests/docker/engine.py).
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from tests.docker.engine import REPO_ROOT
from tests.docker.lockfile import INSTALLED_PY, differences, locked_packages, normalize
from tests.docker.pipeline_repo import IMAGE_UID, STAGES, git, owned_by_image_user

from genderclf import config as C
from genderclf.tracking.setup import CHALLENGER, CHAMPION, MODEL_NAME

pytestmark = pytest.mark.docker

# Run inside the image: who we are, what answers, and every installed distribution.
PROBE = (
    INSTALLED_PY
    + r"""
import json, os, subprocess
run = lambda *a: subprocess.run(a, capture_output=True, text=True)
helped, usage = run("genderclf", "--help"), run("genderclf-entrypoint", "help")
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "home": os.path.expanduser("~"),
    "pid1": open("/proc/1/cmdline").read().split("\0")[0],
    "help_rc": helped.returncode, "help": helped.stdout + helped.stderr,
    "usage_rc": usage.returncode, "usage": usage.stdout, **installed,
}))
"""
)


def test_cpu_image_is_uv_lock_as_a_non_root_user(engine, cpu_image):
    config = engine.inspect(cpu_image)["Config"]
    assert config["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert config["Entrypoint"] == ["tini", "--", "genderclf-entrypoint"]
    assert "GENDERCLF_REPO=/workspace" in config["Env"]

    probe = json.loads(engine.run(cpu_image, "python", "-c", PROBE).stdout)
    assert (probe["uid"], probe["gid"], probe["home"]) == (IMAGE_UID, IMAGE_UID, "/home/genderclf")
    assert probe["pid1"] == "tini"  # signals reach the worker and its flow runs
    assert probe["help_rc"] == 0, probe["help"]
    for command in (*STAGES, "predict", "compare"):
        assert command in probe["help"], command
    assert probe["usage_rc"] == 0 and "worker --pool cpu" in probe["usage"]

    # exactly the lockfile: every locked package of the CPU image at its locked version,
    # nothing else (no dev tools, no GPU wheels), and the project itself
    installed = {normalize(k): v for k, v in probe["dists"].items()}
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert installed.pop("genderclf") == project["version"]
    # (markers of the image's Python: Debian's 3.11.2 takes async-timeout, a 3.11.3+ does not)
    expected = locked_packages(probe["markers"], "server")
    assert installed == expected, differences(installed, expected)
    assert "pytest" not in installed and not any(k.startswith("nvidia-") for k in installed)


@pytest.fixture
def mounted_clone(tmp_path, pipeline_source) -> Path:
    """A git clone of the pipeline, owned by the image's user (the container writes it)."""
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(pipeline_source), str(clone))
    return owned_by_image_user(clone)


def test_image_runs_the_pipeline_on_a_mounted_clone(engine, cpu_image, mounted_clone):
    clone = mounted_clone
    proc = engine.run(cpu_image, "repro", options=["-v", f"{clone}:/workspace"])
    for stage in STAGES:
        assert f"Running stage '{stage}'" in proc.stdout, proc.stdout[-4000:]
    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    # written by the container's non-root user, into the mount
    for out in ("dvc.lock", "mlflow.db", C.PATHS.model, C.PATHS.register_report):
        assert (clone / out).stat().st_uid == IMAGE_UID, out
    report = json.loads((clone / C.PATHS.register_report).read_text())
    assert (report["decision"], report["champion_after"]) == ("promoted", report["version"])

    # the champion resolves in the MLflow SQLite store on the mount ...
    from mlflow import MlflowClient

    uri = f"sqlite:///{clone / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    champion = client.get_model_version_by_alias(MODEL_NAME, CHAMPION)
    assert str(champion.version) == report["version"]
    assert client.get_model_version_by_alias(MODEL_NAME, CHALLENGER).version == champion.version
    run_id = json.loads((clone / C.PATHS.run).read_text())["run_id"]
    assert champion.run_id == run_id
    # ... and its files are there too: the store recorded them under /workspace, the mount
    where = client.get_model_version_download_uri(MODEL_NAME, champion.version)
    local = Path(re.sub(r"^(file://)?/workspace", str(clone), where))
    assert local != Path(where) and (local / "MLmodel").is_file(), where
    import mlflow

    model = mlflow.pyfunc.load_model(str(local))
    assert model.metadata.get_input_schema().input_names() == ["image"]
