"""The Docker engine the `docker` tests use: found, or started as this machine needs it.

This machine (and CI's) reaches no image registry and must not create bridge networks, so
an engine the tests start themselves runs as

    dockerd --storage-driver vfs --bridge=none --iptables=false

and every container runs on the host's network. Images are built with BuildKit from the
local base image (docker/base/build.sh) instead of the public python image.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERD_FLAGS = ("--storage-driver", "vfs", "--bridge=none", "--iptables=false")
LOCAL_BASE = "genderclf-base:py3.11-bookworm"
BASE_LABEL = "org.genderclf.base.script-sha256"
BASE_SCRIPT = REPO_ROOT / "docker" / "base" / "build.sh"
# vfs copies the whole image for every container: creating one of the 3.6 GB genderclf
# image takes about a minute here, removing it about as long.
SLOW = 900


def docker_cli() -> str:
    """A docker CLI that builds with BuildKit.

    `GENDERCLF_DOCKER` if set; else the first of /usr/bin/docker (Debian's docker.io, whose
    20.10 CLI has BuildKit built in) and the `docker` on PATH that has buildx or is older
    than 23 (a newer CLI without the buildx plugin refuses DOCKER_BUILDKIT=1).
    """
    if os.environ.get("GENDERCLF_DOCKER"):
        return os.environ["GENDERCLF_DOCKER"]
    candidates = [c for c in ("/usr/bin/docker", shutil.which("docker")) if c and Path(c).exists()]
    for cli in dict.fromkeys(candidates):
        version = subprocess.run(
            [cli, "version", "--format", "{{.Client.Version}}"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
        major = version.split(".")[0]
        if major.isdigit() and int(major) < 23:
            return cli
        buildx = subprocess.run([cli, "buildx", "version"], capture_output=True, timeout=60)
        if buildx.returncode == 0:
            return cli
    raise RuntimeError(
        "no docker CLI that builds with BuildKit: `apt-get install docker.io` (.ci/run does), "
        "or set GENDERCLF_DOCKER"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports (held together while chosen, so never equal)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Engine:
    """The docker CLI against a running engine, plus what the tests measured with it."""

    cli: str
    started_here: bool = False
    builds: dict[str, dict[str, float]] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_BUILDKIT": "1"}

    def __call__(
        self, *args: str, timeout: float = SLOW, check: bool = True, redact: Iterable[str] = ()
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.cli, *args], capture_output=True, text=True, timeout=timeout, env=self.env()
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                hide(
                    f"docker {' '.join(args[:3])} ... exited {proc.returncode}\n--- stdout\n"
                    f"{proc.stdout[-5000:]}\n--- stderr\n{proc.stderr[-5000:]}",
                    redact,
                )
            )
        return proc

    def answers(self) -> bool:
        try:
            return self("info", "--format", "{{.ID}}", timeout=30, check=False).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def has_image(self, tag: str) -> bool:
        return self("image", "inspect", tag, timeout=60, check=False).returncode == 0

    def inspect(self, obj: str) -> dict[str, Any]:
        return json.loads(self("inspect", obj, timeout=60).stdout)[0]

    def image_size(self, tag: str) -> int:
        return int(self("image", "inspect", "--format", "{{.Size}}", tag, timeout=60).stdout)

    def build(
        self,
        tag: str,
        dockerfile: str,
        build_args: dict[str, str] | None = None,
        context: Path = REPO_ROOT,
    ) -> float:
        """`docker build` with BuildKit on the host's network; returns the seconds it took."""
        args = ["build", "--network", "host", "--progress", "plain", "-f", dockerfile, "-t", tag]
        for k, v in (build_args or {}).items():
            args += ["--build-arg", f"{k}={v}"]
        start = time.monotonic()
        self(*args, str(context), timeout=3600)
        took = time.monotonic() - start
        self.builds[tag] = {"seconds": took, "bytes": self.image_size(tag)}
        if self.started_here:
            self.builds[tag]["cache_freed"] = self.drop_build_cache()
        return took

    def root(self) -> str:
        return self("info", "--format", "{{.DockerRootDir}}", timeout=60).stdout.strip()

    def free_bytes(self) -> int:
        """Free space where the engine keeps its images and containers (this host's disk)."""
        return shutil.disk_usage(self.root()).free

    def disk_for_containers(self, images: Iterable[str]) -> int:
        """About what creating one container of each image takes: on vfs two full copies of
        the image (the container's init layer and its own), on a copy-on-write driver
        next to nothing."""
        driver = self("info", "--format", "{{.Driver}}", timeout=60).stdout.strip()
        if driver != "vfs":
            return 0
        return sum(2 * self.image_size(image) for image in images)

    def drop_build_cache(self) -> int:
        """Remove BuildKit's cache; returns the bytes it held on disk.

        Done after each build on an engine the tests started (a throwaway one, as in CI):
        on vfs every cached step is a full copy, and the CPU image's build stage and its uv
        cache hold 11.7 GB that no container needs. A running engine keeps its cache.
        """
        before = self.free_bytes()
        self("builder", "prune", "--all", "--force", timeout=SLOW)
        return max(0, self.free_bytes() - before)

    def run(
        self, image: str, *args: str, options: Iterable[str] = (), timeout: float = SLOW
    ) -> subprocess.CompletedProcess[str]:
        """`docker run --rm --network host [options] image args` (always host networking)."""
        return self("run", "--rm", "--network", "host", *options, image, *args, timeout=timeout)

    def remove(self, *containers: str) -> None:
        if containers:
            self("rm", "--force", "--volumes", *containers, timeout=SLOW, check=False)

    def logs(self, container: str, redact: Iterable[str] = (), tail: int = 60) -> str:
        proc = self("logs", "--tail", str(tail), container, timeout=60, check=False)
        return hide(proc.stdout + proc.stderr, redact)

    def networks(self) -> set[str]:
        return set(self("network", "ls", "--format", "{{.Name}}", timeout=60).stdout.split())


def hide(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret replaced by ***: test output never shows one."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def start_dockerd(log: Path, timeout: float = 120) -> subprocess.Popen[bytes]:
    """Start dockerd (root only) with this machine's flags; wait until it answers."""
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise RuntimeError(
            "dockerd is not installed: `apt-get install docker.io docker-compose "
            "debootstrap` (.ci/run does)"
        )
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [dockerd, *DOCKERD_FLAGS], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    probe = Engine(docker_cli())
    deadline = time.monotonic() + timeout
    while not probe.answers():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_dockerd(proc)
            raise RuntimeError(f"dockerd did not start:\n{log.read_text()[-4000:]}")
        time.sleep(1)
    return proc


def stop_dockerd(proc: subprocess.Popen[bytes]) -> None:
    """Stop a dockerd this session started (it stops the containerd it started too)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def script_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def ensure_local_base(engine: Engine) -> float | None:
    """Build the local base image unless one made by today's build.sh exists.

    Returns the seconds the build took, or None when the existing image was kept.
    """
    if engine.has_image(LOCAL_BASE):
        labels = engine.inspect(LOCAL_BASE)["Config"].get("Labels") or {}
        if labels.get(BASE_LABEL) == script_sha256(BASE_SCRIPT):
            return None
    if os.geteuid() != 0:
        raise RuntimeError(
            f"{LOCAL_BASE} is missing or stale and only root can build it: "
            f"sudo {BASE_SCRIPT.relative_to(REPO_ROOT)}"
        )
    start = time.monotonic()
    proc = subprocess.run(
        ["sh", str(BASE_SCRIPT), LOCAL_BASE],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**engine.env(), "PATH": _path_with(engine.cli)},
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{BASE_SCRIPT.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    took = time.monotonic() - start
    engine.builds[LOCAL_BASE] = {"seconds": took, "bytes": engine.image_size(LOCAL_BASE)}
    return took


def _path_with(cli: str) -> str:
    return f"{Path(cli).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def http_json(
    url: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 15
) -> Any:
    """GET (or POST `body` as JSON) a loopback URL; the decoded JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def wait_http(
    url: str, timeout: float, headers: dict[str, str] | None = None, alive: Any = None
) -> None:
    """Wait until `url` answers 200; `alive()` returning a message aborts the wait."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (OSError, urllib.error.HTTPError):
            pass
        if alive is not None and (why := alive()):
            raise AssertionError(why)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(2)
