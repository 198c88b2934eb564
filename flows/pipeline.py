"""Prefect orchestration of the DVC pipeline: the `gender-pipeline` flow.

Prefect runs the pipeline that `dvc.yaml` defines; it does not define the stages a second
time. The stage order comes from DVC's own graph, and each stage runs as
`dvc repro --single-item <stage>`, so DVC's cache and `dvc.lock` stay the single truth.
The flow asks DVC once (`dvc status`, in process) which stages are stale: those and
everything downstream run; the others end at once in a `Completed` state named `Skipped`,
without starting a DVC process (an up-to-date pipeline costs one status check).

    python flows/pipeline.py                       # whole pipeline, Prefect's ephemeral API
    python flows/pipeline.py -S train.lr_head=0.002

Parameter overrides are validated with the same settings model as the stages, before any
stage runs, and then written into `params.yaml` (format and comments kept), exactly as
`dvc exp run -S` does in the workspace. So `dvc.lock` always matches `params.yaml`. Commit
both, or revert the override.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.states import Completed

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "src"):  # run as a script from a checkout without installing
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from genderclf import config as C  # noqa: E402

# Only the stages that touch the network get retries; a retry around a deterministic
# stage would hide bugs.
RETRIES = {"download": 2, "register": 2}
RETRY_DELAY_S = 5.0
LOCK_FILE = Path(".dvc") / "tmp" / "gender-pipeline.lock"


class StageFailed(RuntimeError):
    """`dvc repro` failed for one stage; the message carries its last output lines."""


class WorkspaceBusy(RuntimeError):
    """Another pipeline run holds the workspace."""


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
        return [(names[s], sorted(names[u] for u in graph.successors(s))) for s in order
                if hasattr(s, "cmd") and s.cmd]  # fmt: skip


def stale_stages(root: Path) -> set[str]:
    """Stages DVC reports as changed (deps, params, outs or missing lock entries).

    One in-process `dvc status` instead of one `dvc repro` process per stage: on an
    up-to-date pipeline the flow then starts no DVC process at all. A stage downstream of
    a stale one runs too (its inputs will change); see `plan`.
    """
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {name.split(":")[-1] for name in repo.status()}


def plan(order: list[tuple[str, list[str]]], stale: set[str]) -> dict[str, bool]:
    """{stage: must run}: stale stages and everything downstream of them."""
    run: dict[str, bool] = {}
    for stage, upstream in order:
        run[stage] = stage in stale or any(run.get(u, False) for u in upstream)
    return run


@task(name="skip")
def skip_stage(stage: str) -> Any:
    """A stage DVC reports up to date: recorded as `Skipped` without starting DVC."""
    return Completed(name="Skipped", message=f"{stage}: up to date (dvc status)",
                     data={"stage": stage, "ran": False})  # fmt: skip


@contextlib.contextmanager
def workspace_lock(root: Path, timeout_s: float) -> Iterator[None]:
    """One pipeline run per workspace: a second run waits up to `timeout_s`, then fails."""
    path = root / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    f.seek(0)
                    holder = f.read().strip() or "another run"
                    raise WorkspaceBusy(
                        f"{root} is in use by {holder}; waited {timeout_s:.0f}s. Wait for it to "
                        "finish or raise lock_timeout; the workspace was not touched."
                    ) from None
                time.sleep(1.0)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


def apply_overrides(params_file: Path, overrides: dict[str, Any]) -> C.Settings:
    """Validate `section.key: value` overrides, then write them into params.yaml.

    Raises:
        SettingsError: an override names an unknown key or an invalid value; the file
            is left untouched.
    """
    from ruamel.yaml import YAML

    raw = _merged(params_file, overrides)
    settings = C.parse_settings(raw, f"{params_file} with overrides {overrides}")
    ry = YAML()
    ry.preserve_quotes = True
    doc = ry.load(params_file.read_text())
    for dotted, value in overrides.items():
        node = doc
        *parents, leaf = dotted.split(".")
        for p in parents:
            if p not in node:
                node[p] = {}
            node = node[p]
        node[leaf] = value
    tmp = params_file.with_name(f".{params_file.name}.tmp")
    with open(tmp, "w") as f:
        ry.dump(doc, f)
    os.replace(tmp, params_file)
    return settings


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr_head=0.002` -> ("train.lr_head", 0.002) (the value is parsed as YAML)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise C.SettingsError(f"override {text!r}: expected section.key=value")
    return key.strip(), yaml.safe_load(value)


@task(task_run_name="{stage}", log_prints=True)
def run_stage(stage: str, root: str) -> Any:
    """Run one DVC stage (`dvc repro --single-item`), streaming its output to the log."""
    logger = get_run_logger()
    proc = subprocess.Popen(
        [dvc_exe(), "repro", "--single-item", stage], cwd=root, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env=os.environ.copy(),
    )  # fmt: skip
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if "\r" in line:  # progress bars: keep the last frame only
            line = line.rsplit("\r", 1)[-1]
        lines.append(line)
        if line:
            logger.info(line)
    rc = proc.wait()
    if rc != 0:
        tail = "\n".join(lines[-15:])
        raise StageFailed(f"stage {stage!r} failed (dvc exited {rc}):\n{tail}")
    text = "\n".join(lines)
    if f"Stage '{stage}' didn't change" in text or "is cached - skipping" in text:
        return Completed(name="Skipped", message=f"{stage}: up to date, DVC skipped it",
                         data={"stage": stage, "ran": False})  # fmt: skip
    return {"stage": stage, "ran": True}


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def publish_artifacts(root: Path) -> None:
    """Validation summary, evaluation metrics and the promotion decision, as Prefect artifacts."""
    val = _read_json(root / C.VALIDATION_METRICS)
    if val:
        rejected = root / C.REJECTED_FILE
        sample = rejected.read_text().splitlines()[1:11] if rejected.is_file() else []
        reasons = "\n".join(f"| {k} | {v} |" for k, v in sorted(val["reject_reasons"].items()))
        create_markdown_artifact(
            key="validation-summary",
            markdown=(
                f"## Validation\n\nlayout `{val['layout']}`: **{val['usable']}** usable, "
                f"**{val['rejected']}** rejected of {val['files_seen']} files "
                f"(reject fraction {val['reject_fraction']:.4f}); male fraction "
                f"{val['male_fraction']}; expectations passed: {val['expectations_passed']}\n\n"
                + ("| reason | files |\n|---|---|\n" + reasons + "\n\n" if reasons else "")
                + ("First rejected files:\n\n```\n" + "\n".join(sample) + "\n```\n" if sample else "")
            ),
            description="Data validation: counts and rejected files",
        )  # fmt: skip
    ev = _read_json(root / C.METRICS_DIR / "eval.json")
    if ev:
        keys = ("accuracy", "precision", "recall", "f1", "roc_auc", "ece", "threshold", "n")
        create_table_artifact(
            key="evaluation-metrics",
            table=[{"metric": k, "value": ev.get(k)} for k in keys],
            description="Test-split metrics (threshold chosen on the validation split)",
        )
    reg = _read_json(root / C.REGISTER_REPORT)
    if reg:
        before = reg["champion_before"]
        create_markdown_artifact(
            key="promotion-decision",
            markdown=(
                f"## Promotion: version {reg['version']} **{reg['decision']}**\n\n"
                f"* candidate accuracy: {reg['candidate']['accuracy']:.4f}\n"
                f"* champion before: version {before['version']} "
                f"(accuracy {before['accuracy'] if before['accuracy'] is None else round(before['accuracy'], 4)})\n"
                f"* champion after: version {reg['champion_after']}\n"
                f"* reason: {'; '.join(reg['reasons'])}\n"
            ),
            description="Model registry decision",
        )  # fmt: skip


def start_mlflow_run(flow_run_id: str, flow_run_name: str) -> tuple[str, str]:
    """Create the MLflow run every stage of this flow run logs into. Returns (id, url)."""
    from mlflow import MlflowClient

    from genderclf.tracking.setup import EXPERIMENT, configure, tracking_uri

    configure()
    client = MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT)
    run = client.create_run(exp.experiment_id, run_name=flow_run_name,
                            tags={"prefect.flow_run_id": flow_run_id,
                                  "prefect.flow_run_name": flow_run_name})  # fmt: skip
    uri = tracking_uri()
    base = (
        uri if uri.startswith("http") else os.environ.get("MLFLOW_UI_URL", "http://127.0.0.1:5000")
    )
    from genderclf.tracking.setup import redact

    url = f"{redact(base).rstrip('/')}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"
    return run.info.run_id, url


@flow(name="gender-pipeline", log_prints=True)
def gender_pipeline(
    overrides: dict[str, Any] | None = None,
    train_on: str = "local",
    repo: str | None = None,
    lock_timeout: float = 600.0,
) -> dict[str, Any]:
    """Run every stage of dvc.yaml through DVC, in DVC's order.

    Args:
        overrides: `{"train.lr_head": 0.002, ...}`: validated, then written to params.yaml.
        train_on: `local`, or a deployment name (e.g. `train/gpu`) to train on a worker.
        repo: the workspace (default: this checkout).
        lock_timeout: seconds to wait for another run on the same workspace.

    Returns:
        {stage: "ran" | "skipped"} plus the MLflow run id and URL.
    """
    from prefect.runtime import flow_run

    logger = get_run_logger()
    root = Path(repo).resolve() if repo else REPO
    params_file = root / C.PARAMS_FILE
    # The stages run in `root` and default to its sqlite store; so does the flow.
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    # Fail before any stage runs: a bad override or params file is a SettingsError here.
    if overrides:
        C.parse_settings(_merged(params_file, overrides), f"{params_file} with overrides")
    with workspace_lock(root, lock_timeout):
        if overrides:
            apply_overrides(params_file, overrides)
            logger.info("overrides written to %s: %s", params_file, overrides)
        else:
            C.load_settings(params_file)
        run_id, url = start_mlflow_run(str(flow_run.id), str(flow_run.name))
        os.environ["MLFLOW_RUN_ID"] = run_id  # the train stage adopts this run
        create_link_artifact(key="mlflow-run", link=url, link_text=f"MLflow run {run_id[:8]}",
                             description="Every stage of this flow run logs into this MLflow run")  # fmt: skip
        logger.info("MLflow run: %s", url)
        summary: dict[str, Any] = {"mlflow_run_id": run_id, "mlflow_run_url": url}
        try:
            order = stage_order(root)
            todo = plan(order, stale_stages(root))
            for stage, _upstream in order:
                if not todo[stage]:
                    skip_stage.with_options(task_run_name=f"{stage} (up to date)")(stage)
                    summary[stage] = "skipped"
                    continue
                if stage == "train" and train_on != "local":
                    from flows.train import train_remotely

                    summary[stage] = train_remotely(root, train_on)
                    continue
                task_fn = run_stage.with_options(
                    retries=RETRIES.get(stage, 0), retry_delay_seconds=RETRY_DELAY_S
                )
                state = task_fn(stage, str(root), return_state=True)
                if state.is_failed():
                    publish_artifacts(root)
                    state.result()  # raises the stage's error
                summary[stage] = "skipped" if state.name == "Skipped" else "ran"
        finally:
            os.environ.pop("MLFLOW_RUN_ID", None)
            _finish_mlflow_run(run_id)
        publish_artifacts(root)
    return summary


def _merged(params_file: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    import yaml

    raw = yaml.safe_load(params_file.read_text()) if params_file.is_file() else {}
    raw = raw or {}
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise C.SettingsError(f"override {dotted!r}: {p!r} is not a section")
        node[leaf] = value
    return raw


def _finish_mlflow_run(run_id: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    with contextlib.suppress(Exception):
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the gender-pipeline flow (Prefect).")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a param, e.g. -S train.lr_head=0.002 (repeatable)")  # fmt: skip
    ap.add_argument("--train-on", default="local", help="`local` or a deployment, e.g. train/gpu")
    args = ap.parse_args(argv)
    try:
        overrides = dict(parse_override(s) for s in args.set)
    except C.SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = gender_pipeline(overrides=overrides or None, train_on=args.train_on)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
