"""What uv.lock says an image must hold, and what an image holds: both as {name: version}."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
from tests.docker.engine import REPO_ROOT

# Python run inside an image (prepended to a probe): `installed` holds its distributions
# and its PEP 508 marker environment (packaging.markers.default_environment(), without
# needing packaging in the image).
INSTALLED_PY = r"""
import importlib.metadata as _md, os as _os, platform as _pf, sys as _sys
installed = {
    "dists": {d.metadata["Name"]: d.version for d in _md.distributions()},
    "markers": {
        "implementation_name": _sys.implementation.name,
        "implementation_version": _pf.python_version(),
        "os_name": _os.name, "platform_machine": _pf.machine(),
        "platform_release": _pf.release(), "platform_system": _pf.system(),
        "platform_version": _pf.version(), "python_full_version": _pf.python_version(),
        "platform_python_implementation": _pf.python_implementation(),
        "python_version": ".".join(_pf.python_version_tuple()[:2]),
        "sys_platform": _sys.platform,
    },
}
"""


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _uv() -> list[str]:
    uv = shutil.which("uv")
    if uv:
        return [uv]
    if subprocess.run([sys.executable, "-m", "uv", "--version"], capture_output=True).returncode:
        pytest.fail("uv is needed to read uv.lock: `make setup` installs it")
    return [sys.executable, "-m", "uv"]


def locked_packages(markers: dict[str, str], *extras: str) -> dict[str, str]:
    """{name: version} that uv.lock gives the platform `markers` describe (a PEP 508 marker
    environment) with `extras` and no dev group."""
    from packaging.markers import Marker

    args = [
        *_uv(),
        "export",
        "--frozen",
        "--no-dev",
        "--no-hashes",
        "--no-emit-project",
        "--no-header",
        "--no-annotate",
        *(f"--extra={e}" for e in extras),
    ]
    proc = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = {}
    for line in proc.stdout.splitlines():
        req, _, marker = line.partition(";")
        if "==" not in req or (marker.strip() and not Marker(marker.strip()).evaluate(markers)):
            continue
        name, _, version = req.strip().partition("==")
        out[normalize(name.split("[")[0])] = version.strip()
    return out


def differences(installed: dict[str, str], expected: dict[str, str]) -> dict[str, list[str]]:
    """What keeps `installed` from being `expected` (for assertion messages)."""
    both = set(installed) & set(expected)
    return {
        "missing": sorted(set(expected) - set(installed)),
        "extra": sorted(set(installed) - set(expected)),
        "other version": sorted(k for k in both if installed[k] != expected[k]),
    }
