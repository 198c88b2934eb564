"""Overhead of an up-to-date pipeline: no-op `dvc repro` and the Prefect flow, median of runs.

A temporary `git clone` of this repository (its committed HEAD) gets tiny params (the
test suite's sizes: 120 sample images at 32 px, simple_cnn, one epoch per phase) and one
full `dvc repro`, which makes every stage up to date. Then, with nothing changed:

  * `dvc repro` (all stages), `--repeats` times;
  * `python flows/pipeline.py` (the gender-pipeline flow, `--flow-repeats` times), each
    run a fresh process that starts Prefect's ephemeral API (no PREFECT_API_URL), checks
    every stage through `dvc` and skips it, and opens and closes its MLflow run.

Each run's wall time is measured from outside (process start to exit), so interpreter and
import time count; its CPU time (user + system, children included) is shown beside it,
since on a shared machine wall time stretches with the load. The median is reported against
the targets (3 s and 20 s). The first flow run also creates Prefect's database and is
shown separately.

    uv run python benchmarks/overhead.py
    uv run python benchmarks/overhead.py --repeats 7 --flow-repeats 5 --keep
    uv run python benchmarks/overhead.py --reuse /tmp/overhead-XXXX   # a kept clone again
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The test suite's tiny sizes (tests/conftest.py TINY), plus a short training.
TINY = {
    "base.image_size": 32,
    "data.sample.num_images": 120,
    "data.sample.images_per_identity": 4,
    "validate.min_rows": 10,
    "augment.shard_size": 16,
    "train.backbone": "simple_cnn",
    "train.weights": None,
    "train.epochs_head": 1,
    "train.epochs_finetune": 1,
}


def env_for(root: Path, repo: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(repo / "src")  # the clone's code, which DVC hashes
    env["DVC_NO_ANALYTICS"] = "1"
    env["DVC_SITE_CACHE_DIR"] = str(root / "dvc-site-cache")
    env["GIT_CONFIG_GLOBAL"] = os.devnull
    env["GIT_CONFIG_NOSYSTEM"] = "1"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{repo / 'mlflow.db'}"
    env["PREFECT_HOME"] = str(root / "prefect-home")  # a fresh ephemeral-API database
    env.pop("PREFECT_API_URL", None)
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    return env


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(
    cmd: list[str], cwd: Path, env: dict[str, str], expect: str | None = None
) -> tuple[float, float]:
    """Run `cmd`; return (wall seconds, CPU seconds of it and all its descendants)."""
    c, t = _children_cpu(), time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    dt, cpu = time.perf_counter() - t, _children_cpu() - c
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    if expect is not None and expect not in out.stdout + out.stderr:
        raise SystemExit(
            f"{' '.join(cmd)}: expected {expect!r} in its output:\n{out.stdout[-3000:]}"
        )
    return dt, cpu


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=5, help="no-op `dvc repro` runs")
    ap.add_argument("--flow-repeats", type=int, default=3, help="no-op flow runs after the first")
    ap.add_argument("--keep", action="store_true", help="keep the temporary clone")
    ap.add_argument(
        "--reuse",
        metavar="DIR",
        help="a folder kept by --keep (DIR/repo): skip the clone and first run",
    )
    args = ap.parse_args()

    if args.reuse:
        root = Path(args.reuse).resolve()
        repo = root / "repo"
    else:
        root = Path(tempfile.mkdtemp(prefix="overhead-"))
        repo = root / "repo"
    env = env_for(root, repo)
    dvc = str(BIN / "dvc")
    try:
        if not args.reuse:
            subprocess.run(["git", "clone", "-q", str(REPO), str(repo)], check=True, env=env)
            # The clone's own params.yaml: the working tree may hold keys its code does not know.
            params = yaml.safe_load((repo / "params.yaml").read_text())
            for key, value in TINY.items():
                node = params
                *parents, leaf = key.split(".")
                for p in parents:
                    node = node[p]
                node[leaf] = value
            (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        first, _ = timed([dvc, "repro"], repo, env)
        print(
            f"first `dvc repro` (tiny params; every stage runs unless reused): {first:.1f}s "
            f"(load {os.getloadavg()[0]:.2f})",
            flush=True,
        )

        repro, repro_cpu = [], []
        for _ in range(args.repeats):
            wall, cpu = timed([dvc, "repro"], repo, env, expect="up to date")
            repro.append(wall)
            repro_cpu.append(cpu)
            print(
                f"no-op dvc repro: {wall:.2f}s wall, {cpu:.2f}s CPU "
                f"(load {os.getloadavg()[0]:.2f})",
                flush=True,
            )
        flow_cmd = [sys.executable, "flows/pipeline.py"]
        flow_first, _ = timed(flow_cmd, repo, env, expect='"skipped"')
        print(
            f"first no-op flow (creates Prefect's database): {flow_first:.1f}s "
            f"(load {os.getloadavg()[0]:.2f})",
            flush=True,
        )
        flow, flow_cpu = [], []
        for _ in range(args.flow_repeats):
            wall, cpu = timed(flow_cmd, repo, env, expect='"skipped"')
            flow.append(wall)
            flow_cpu.append(cpu)
            print(
                f"no-op flow: {wall:.1f}s wall, {cpu:.1f}s CPU (load {os.getloadavg()[0]:.2f})",
                flush=True,
            )

        m_repro, m_flow = statistics.median(repro), statistics.median(flow)
        print(f"\n{'what':<40}{'median wall':>12}{'median CPU':>12}{'wall runs':>36}{'target':>9}")
        print(
            f"{'dvc repro, up to date':<40}{m_repro:>11.2f}s{statistics.median(repro_cpu):>11.2f}s"
            f"{', '.join(f'{x:.2f}' for x in repro):>36}{'< 3 s':>9}"
            f"  {'met' if m_repro < 3 else 'NOT met'}"
        )
        print(
            f"{'python flows/pipeline.py, up to date':<40}{m_flow:>11.1f}s"
            f"{statistics.median(flow_cpu):>11.1f}s"
            f"{', '.join(f'{x:.1f}' for x in flow):>36}{'< 20 s':>9}"
            f"  {'met' if m_flow < 20 else 'NOT met'}"
        )
        print(
            "(CPU = user + system seconds of the run and its children; on a loaded machine "
            "wall time stretches, CPU time much less)"
        )
        print(f"load average at end: {os.getloadavg()}")
    finally:
        if args.keep or args.reuse:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
