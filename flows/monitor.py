"""Prefect flows that notice new images and check them for drift: `watch` and `monitor`.

    watch (every few minutes)
      --genderclf.data.arrived-->  monitor
      --genderclf.drift.detected-->  gender-pipeline

* `watch` lists a folder or S3 prefix (`genderclf.monitor.batch`), compares the listing
  with the one it stored last time (`.dvc/tmp/watch/`, one file per location), and emits
  `genderclf.data.arrived` naming where the new files are: the deepest folder holding all
  of them (drop each batch into its own subfolder, `incoming/2026-12-01/`, and the event
  names that folder). The first listing of a location is a baseline and emits nothing, so
  pointing it at a full bucket does not start a check of everything.
* `monitor` runs `genderclf drift` on a location (a process, like the stages: TensorFlow's
  memory goes with it) and, when the batch drifts, emits `genderclf.drift.detected` with
  the key numbers; nothing on no drift.

The deployments in `prefect.yaml` wire them with triggers: `monitor` runs on each
`genderclf.data.arrived`, and `gender-pipeline/on-demand` on each `genderclf.drift.detected`.
Events carry the resource id `genderclf.dataset.<location>`.

A watch refuses a location that would show it the pipeline's own files (`check_location`):
none, the workspace or a folder above it, a folder the pipeline manages (`data/`,
`reports/`, `mlruns/`, ...), or one that holds the MLflow artifacts. Else each drift check
(its `reports/drift/drift.png`, its artifacts) would be "new images" for the next watch,
which would start another check: a loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import subprocess
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event
from prefect.states import Failed

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "src"):  # run as a script from a checkout without installing
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from genderclf import config as C  # noqa: E402
from genderclf.io import write_json  # noqa: E402
from genderclf.monitor.batch import BatchError, is_s3, list_images  # noqa: E402
from genderclf.monitor.drift import DRIFT_EXIT_CODE  # noqa: E402
from genderclf.tracking.setup import local_artifact_root, tracking_uri  # noqa: E402

DATA_ARRIVED = "genderclf.data.arrived"
DRIFT_DETECTED = "genderclf.drift.detected"
STATE_DIR = Path(".dvc") / "tmp" / "watch"  # the last listing of each watched location
# Folders of a workspace that are not new data: tools' and stores' own, plus the top
# folder of every path the stages write (`C.Paths`: data/, models/, reports/, ...).
TOOL_FOLDERS = (".git", ".dvc", ".venv", "mlruns", "mlartifacts", ".prefect")


class WatchLocationError(BatchError):
    """A watch location that is missing or would list the pipeline's own files."""


def managed_folders(root: Path) -> list[Path]:
    """The folders of the workspace `root` that the pipeline and its tools write."""
    from dataclasses import fields

    tops = {Path(getattr(C.PATHS, f.name)).parts[0] for f in fields(C.Paths)}
    tops -= {C.PATHS.params.name}
    return [root / name for name in sorted(tops | set(TOOL_FOLDERS))]


def check_location(location: str, root: Path) -> str:
    """Where `watch` lists: `location` made absolute (relative to the workspace `root`).

    Raises:
        WatchLocationError: no location (the deployment was made without
            GENDERCLF_WATCH); the workspace or a folder that holds it; a folder inside
            one the pipeline manages; or one that holds the MLflow store's local artifacts
            (each check logs its plot there).
    """
    fix = "set the deployment's `location` to a folder of its own, e.g. incoming/, or s3://"
    if not location.strip():
        raise WatchLocationError(
            f"watch: no location to list (GENDERCLF_WATCH was not set when the deployment "
            f"was made): {fix}bucket/prefix"
        )
    if is_s3(location):
        return location
    root = root.resolve()
    where = (root / location).resolve()
    if root.is_relative_to(where):
        raise WatchLocationError(
            f"watch: {location} is {'the workspace' if where == root else 'above the workspace'} "
            f"{root}: it would list the pipeline's own files (each drift check's plot would be "
            f"new data for the next watch): {fix}"
        )
    for folder in managed_folders(root):
        if where.is_relative_to(folder):
            raise WatchLocationError(
                f"watch: {location} is inside {folder.name}/, which the pipeline manages: {fix}"
            )
    artifacts = local_artifact_root(tracking_uri())
    if artifacts is not None and (
        artifacts.is_relative_to(where) or where.is_relative_to(artifacts)
    ):
        raise WatchLocationError(
            f"watch: {location} holds the MLflow artifacts ({artifacts}), where each drift "
            f"check logs its plot: {fix}"
        )
    return str(where)


def resource_id(location: str) -> str:
    """The events' resource: `genderclf.dataset.<location>`."""
    return f"genderclf.dataset.{location}"


def _root(repo: str | None) -> Path:
    root = Path(repo).resolve() if repo else REPO
    # The command runs in `root` and defaults to its sqlite store; so does the flow.
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    return root


def batch_location(location: str, new: list[str]) -> str:
    """The deepest folder under `location` that holds every new file (`location` itself
    when they are spread over several folders or lie at its top)."""
    parents = {posixpath.dirname(n) for n in new}
    common = posixpath.commonpath(sorted(parents)) if parents and "" not in parents else ""
    if not common:
        return location
    sep = "" if location.endswith("/") else "/"
    return f"{location}{sep}{common}"


def _state_file(root: Path, location: str) -> Path:
    return root / STATE_DIR / f"{hashlib.sha256(location.encode()).hexdigest()[:16]}.json"


@task(name="list")
def list_location(location: str, root: str) -> dict[str, str]:
    """{name: version stamp} of the images under `location` (S3 endpoint and retries from
    `data.s3` in params.yaml)."""
    s3 = C.load_settings(Path(root) / C.PATHS.params).data.s3
    entries, _ = list_images(location, s3.endpoint_url if is_s3(location) else None, s3.retries)
    return {e.name: f"{e.size}:{e.stamp}" for e in entries}


@flow(name="watch", log_prints=True)
def watch(location: str, repo: str | None = None) -> dict[str, Any]:
    """Emit `genderclf.data.arrived` when images were added or changed under `location`
    since the last run (the first run records a baseline).

    Args:
        location: a folder (absolute, or relative to the workspace) or s3://bucket/prefix.
        repo: the workspace (default: this checkout).

    Returns:
        {"new": count, "batch": where the new files are, "event_id": ...}.
    """
    logger = get_run_logger()
    root = _root(repo)
    try:
        where = check_location(location, root)
    except WatchLocationError as err:
        logger.error(str(err))
        return Failed(message=str(err))  # one line in the log, no traceback
    now = list_location(where, str(root))
    state = _state_file(root, location)
    before = json.loads(state.read_text())["files"] if state.is_file() else None
    new = sorted(n for n, stamp in now.items() if before is not None and before.get(n) != stamp)
    out: dict[str, Any] = {
        "location": location,
        "images": len(now),
        "new": len(new),
        "batch": None,
        "event_id": None,
    }
    if before is None:
        logger.info(
            "watch: first listing of %s (%d images) recorded as the baseline", location, len(now)
        )
    elif new:
        batch = batch_location(where, new)
        event = emit_event(
            event=DATA_ARRIVED,
            resource={"prefect.resource.id": resource_id(batch), "prefect.resource.name": batch},
            payload={
                "location": batch,
                "watched": location,
                "new_files": len(new),
                "examples": new[:10],
            },
        )
        out.update(batch=batch, event_id=str(event.id) if event else None)
        logger.info("watch: %d new images under %s: emitted %s", len(new), batch, DATA_ARRIVED)
    else:
        logger.info("watch: no new images under %s (%d listed)", location, len(now))
    write_json(state, {"location": location, "files": now})
    return out


@task(name="drift")
def run_drift(location: str, root: str) -> dict[str, Any]:
    """`genderclf drift LOCATION` in `root`, its output in the log; returns drift.json.

    Raises:
        RuntimeError: the check did not run (exit other than 0 or 3), with its message.
    """
    logger = get_run_logger()
    proc = subprocess.run(
        [sys.executable, "-m", "genderclf.cli", "drift", location],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ},
    )
    for line in (proc.stdout + proc.stderr).splitlines()[-40:]:
        logger.info(line)
    if proc.returncode not in (0, DRIFT_EXIT_CODE):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(
            f"genderclf drift {location} failed (exit {proc.returncode}): " + " / ".join(tail)
        )
    return json.loads((Path(root) / C.PATHS.drift / "drift.json").read_text())


def event_payload(result: dict[str, Any]) -> dict[str, Any]:
    """The key numbers of a drift check, for `genderclf.drift.detected`."""
    v = result["views"]
    return {
        "location": result["batch"]["location"],
        "champion_version": result["champion"].get("version"),
        "images": result["batch"]["images"],
        "unreadable": len(result["batch"]["failed"]),
        "views": [k for k in ("image", "embeddings", "predictions") if v[k]["drifted"]],
        "features": [f["name"] for f in v["image"]["features"] if f["drifted"]],
        "mmd_p_value": v["embeddings"]["p_value"],
        "male_fraction": v["predictions"]["batch_male_fraction"],
        "male_fraction_delta": v["predictions"]["male_fraction_delta"],
        "mean_confidence": v["predictions"]["batch_mean_confidence"],
        "summary": result["summary"],
    }


@flow(name="monitor", log_prints=True)
def monitor(location: str, repo: str | None = None) -> dict[str, Any]:
    """Check `location` for drift against the champion; emit `genderclf.drift.detected`
    when it drifted (the `on-demand` pipeline deployment is triggered by it).

    Returns:
        {"drifted", "summary", "event_id"} (event_id None when nothing was emitted).
    """
    root = _root(repo)
    result = run_drift(location, str(root))
    create_markdown_artifact(
        (root / C.PATHS.drift / "summary.md").read_text(),
        key="drift-check",
        description=f"drift check of {location}",
    )
    event = None
    if result["drifted"]:
        event = emit_event(
            event=DRIFT_DETECTED,
            resource={
                "prefect.resource.id": resource_id(location),
                "prefect.resource.name": location,
            },
            payload=event_payload(result),
        )
    print(result["summary"])
    return {
        "drifted": result["drifted"],
        "summary": result["summary"],
        "event_id": str(event.id) if event else None,
    }


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Run the monitor (or watch) flow once.")
    ap.add_argument("location", help="a folder or s3://bucket/prefix")
    ap.add_argument("--watch", action="store_true", help="list for new files instead")
    args = ap.parse_args()
    state = (watch if args.watch else monitor)(args.location, return_state=True)
    if state.is_failed():
        sys.exit(f"error: {state.message}")
    print(json.dumps(state.result(), indent=2))
