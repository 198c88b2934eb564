"""The one place that calls DVC: the stage graph, what is stale, running a stage, the remote.

Prefect runs the pipeline that `dvc.yaml` defines; it does not define the stages a second
time, and every flow goes through these functions to reach DVC. (Not named `dvc.py`: run
as a script, `flows/` is first on sys.path and would shadow the `dvc` package.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml


class DvcFailed(RuntimeError):
    """A `dvc` command failed; the message carries its last output lines."""


def dvc_exe() -> str:
    """The dvc executable: `GENDERCLF_DVC` if set, else the one next to this Python."""
    return os.environ.get("GENDERCLF_DVC") or str(Path(sys.executable).parent / "dvc")


def stage_order(root: Path) -> list[tuple[str, list[str]]]:
    """Stages of `dvc.yaml` in dependency order, each with its upstream stages (from DVC)."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        order = list(reversed(list(nx.topological_sort(graph))))
        names = {s: getattr(s, "name", str(s)) for s in graph.nodes}
        return [
            (names[s], sorted(names[u] for u in graph.successors(s)))
            for s in order
            if hasattr(s, "cmd") and s.cmd
        ]


def stale_stages(root: Path) -> set[str]:
    """Stages DVC reports as changed (deps, params, outs or missing lock entries).

    One in-process `dvc status` instead of one `dvc repro` process per stage: on an
    up-to-date pipeline a flow then starts no DVC process at all.
    """
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {name.split(":")[-1] for name in repo.status()}


def always_changed(root: Path) -> set[str]:
    """Stages `dvc.yaml` marks `always_changed` (download: it checks its source each run)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    return {name for name, spec in stages.items() if spec.get("always_changed")}


def locked_outs(root: Path, stage: str) -> list[Any]:
    """The outputs `dvc.lock` records for `stage` (paths and hashes)."""
    return read_lock(root).get("stages", {}).get(stage, {}).get("outs", [])


def run(root: Path, *args: str, on_line: Callable[[str], None] | None = None) -> str:
    """Run `dvc <args>` in `root`; stream each output line to `on_line` if given.

    Returns:
        The whole output (stdout and stderr).

    Raises:
        DvcFailed: dvc exited non-zero.
    """
    proc = subprocess.Popen(
        [dvc_exe(), *args],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ.copy(),
    )
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if "\r" in line:  # progress bars: keep the last frame only
            line = line.rsplit("\r", 1)[-1]
        lines.append(line)
        if on_line is not None and line:
            on_line(line)
    rc = proc.wait()
    if rc != 0:
        tail = "\n".join(lines[-15:])
        raise DvcFailed(f"dvc {' '.join(args)} failed in {root} (exit {rc}):\n{tail}")
    return "\n".join(lines)


def repro_stage(root: Path, stage: str, on_line: Callable[[str], None] | None = None) -> bool:
    """`dvc repro --single-item <stage>`. Returns False when DVC found it up to date, or,
    for an `always_changed` stage, when its command left its outputs as they were."""
    before = locked_outs(root, stage)
    text = run(root, "repro", "--single-item", stage, on_line=on_line)
    if f"Stage '{stage}' didn't change" in text or "is cached - skipping" in text:
        return False
    return not (stage in always_changed(root) and before and locked_outs(root, stage) == before)


def read_lock(root: Path) -> dict[str, Any]:
    p = root / "dvc.lock"
    return (yaml.safe_load(p.read_text()) or {}) if p.is_file() else {"schema": "2.0", "stages": {}}


def write_lock(root: Path, lock: dict[str, Any]) -> None:
    (root / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))


def uncached_outs(root: Path, stage: str) -> list[str]:
    """Outputs of `stage` that DVC does not cache (they must travel another way)."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"][stage]
    paths = []
    for kind in ("outs", "metrics", "plots"):
        for item in spec.get(kind, []):
            if isinstance(item, dict):
                ((path, opts),) = item.items()
                if opts and opts.get("cache") is False:
                    paths.append(path)
    return paths
