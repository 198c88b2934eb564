"""Prefect orchestration of the DVC pipeline: the `gender-pipeline` flow.

Prefect runs the pipeline that `dvc.yaml` defines; it does not define the stages a second
time. The stage order comes from DVC's own graph, and each stage runs as
`dvc repro --single-item <stage>`, so DVC's cache and `dvc.lock` stay the single truth.
Stages DVC always runs (download, `always_changed`: it checks its source cheaply) run
first; then the flow asks DVC once (`dvc status`, in process) which stages are stale: those
and everything downstream run; the others end at once in a `Completed` state named `Skipped`,
without starting a DVC process (an up-to-date pipeline costs the source check and one
status check).

    python flows/pipeline.py                       # whole pipeline, Prefect's ephemeral API
    python flows/pipeline.py -S train.lr_head=0.002

Parameter overrides are validated once, with the same settings model as the stages,
before any stage runs, and then written into `params.yaml` (format and comments kept),
exactly as `dvc exp run -S` does in the workspace. So `dvc.lock` always matches
`params.yaml`. Commit both, or revert the override. (Run as a script, the same check runs
before Prefect starts, so a misspelt key is one message rather than a failed flow run.)

The flow reaches the stages only through DVC (`flows/dvc_ops.py`) and the registry only
through `genderclf.services`; it imports no stage.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# The ephemeral API server's telemetry heartbeat shares its SQLite file with the flow run
# and fails with "database is locked"; nothing here needs it.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Prefect waits 20 s for the ephemeral server to answer; on two busy cores its start-up
# (database migrations, services) can take longer, and the run then fails before any stage.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.input import RunInput
from prefect.states import Completed

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "src"):  # run as a script from a checkout without installing
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from flows import dvc_ops as dvc  # noqa: E402
from genderclf import config as C  # noqa: E402
from genderclf.contracts import Decision, Evaluation  # noqa: E402
from genderclf.tracking.runs import (  # noqa: E402
    RUN_ID_VARIABLE,
    finish_flow_run,
    start_flow_run,
)

# Only the stages that touch the network get retries; a retry around a deterministic
# stage would hide bugs. Inside a stage, the network calls retry on their own
# (`data.kaggle.retries`, `register.retries`); these re-run the stage's whole process,
# for what kills a process (a dropped worker, a connection reset before the stage's own
# retry starts).
RETRIES = {"download": 2, "register": 2}
RETRY_DELAY_S = 5.0
LOCK_FILE = Path(".dvc") / "tmp" / "gender-pipeline.lock"


class WorkspaceBusy(RuntimeError):
    """Another pipeline run holds the workspace."""


def plan(order: list[tuple[str, list[str]]], stale: set[str]) -> dict[str, bool]:
    """{stage: must run}: stale stages and everything downstream of them."""
    run: dict[str, bool] = {}
    for stage, upstream in order:
        run[stage] = stage in stale or any(run.get(u, False) for u in upstream)
    return run


@task(name="skip")
def skip_stage(stage: str) -> Any:
    """A stage DVC reports up to date: recorded as `Skipped` without starting DVC."""
    return Completed(
        name="Skipped",
        message=f"{stage}: up to date (dvc status)",
        data={"stage": stage, "ran": False},
    )


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

    Format and comments of the file are kept (ruamel.yaml), as `dvc exp run -S` does.

    Raises:
        SettingsError: an override names an unknown key or an invalid value; the file
            is left untouched.
    """
    from ruamel.yaml import YAML

    from genderclf.io import atomic_file

    settings = C.load_settings(params_file, overrides)
    ry = YAML()
    ry.preserve_quotes = True
    doc = ry.load(params_file.read_text())
    for dotted, value in overrides.items():
        C.set_dotted(doc, dotted, value)
    with atomic_file(params_file) as tmp, open(tmp, "w") as f:
        ry.dump(doc, f)
    return settings


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr_head=0.002` -> ("train.lr_head", 0.002) (the value is parsed as YAML)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise C.SettingsError(f"override {text!r}: expected section.key=value")
    return key.strip(), yaml.safe_load(value)


# A line of a stage's output: its level as the CLI, DVC, MLflow or Python warnings print it.
_LEVEL = re.compile(r"(?:^|[\s|:])(DEBUG|INFO|WARNING|ERROR|CRITICAL)(?:[\s|:]|$)")
_PY_WARNING = re.compile(r"\b\w+Warning: ")  # `path.py:12: UserWarning: ...` (Python warnings)
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
PUSH_HINT = "Use `dvc push` to send your updates to remote storage."


def log_stage_line(logger: Any, line: str) -> bool:
    """Log one output line of a stage at its own level; returns True for DVC's push hint
    (said once per flow run, at the end, instead of after every stage)."""
    line = _ANSI.sub("", line).rstrip()
    if not line.strip():
        return False
    if PUSH_HINT in line:
        return True
    m = _LEVEL.search(line[:60])
    level = (
        logging.WARNING
        if _PY_WARNING.search(line)
        else getattr(logging, m.group(1))
        if m
        else logging.INFO
    )
    logger.log(level, line)
    return False


@task(task_run_name="{stage}", log_prints=True)
def run_stage(stage: str, root: str) -> Any:
    """Run one DVC stage (`dvc repro --single-item`), streaming its output to the log, and
    publish the stage's Prefect artifacts."""
    logger = get_run_logger()
    hints: list[bool] = []
    ran = dvc.repro_stage(
        Path(root), stage, on_line=lambda s: hints.append(log_stage_line(logger, s))
    )
    data = {"stage": stage, "ran": ran, "push_hint": any(hints)}
    if not ran:
        return Completed(
            name="Skipped",
            message=f"{stage}: up to date (DVC skipped it, or its command found nothing new)",
            data=data,
        )
    publish_artifacts(stage, Path(root))
    return data


def _run_stage(stage: str, root: Path) -> tuple[dict[str, Any], str]:
    """The stage's task (with its retries): (its result, "ran" | "skipped")."""
    task_fn = run_stage.with_options(
        retries=RETRIES.get(stage, 0), retry_delay_seconds=RETRY_DELAY_S
    )
    state = task_fn(stage, str(root), return_state=True)
    result = state.result()  # raises the stage's error
    return result, "skipped" if state.name == "Skipped" else "ran"


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def publish_artifacts(stage: str, root: Path) -> None:
    """The stage's Prefect artifacts (inside its task run): validate -> the validation
    summary, evaluate -> the test metrics, register -> the decision and a link to the
    registered version."""
    paths = C.PATHS.under(root)
    if stage == "validate" and (val := _read_json(paths.validation_metrics)):
        create_markdown_artifact(
            key="validation-summary",
            markdown=validation_markdown(val, paths),
            description="Data validation: counts and rejected files",
        )
    if stage == "evaluate":
        ev = Evaluation.read(paths.eval_metrics)
        keys = (
            "accuracy",
            "precision",
            "recall",
            "f1",
            "roc_auc",
            "ece",
            "threshold_calibrated",
            "threshold_raw",
            "n",
        )
        create_table_artifact(
            key="evaluation-metrics",
            table=[{"metric": k, "value": _short(getattr(ev, k))} for k in keys],
            description="Test-split metrics (threshold chosen on the validation split; "
            "calibrated: on the calibrated P(male), raw: on the model's raw output)",
        )
    if stage == "register":
        reg = Decision.read(paths.register_report)
        create_markdown_artifact(
            key="promotion-decision",
            markdown=promotion_markdown(reg),
            description="Model registry decision",
        )
        if paths.model_card.is_file():
            create_markdown_artifact(
                key="model-card",
                markdown=paths.model_card.read_text(),
                description=f"Model card of version {reg.version}",
            )
        create_link_artifact(
            key="registered-version",
            link=registry_url(reg.version),
            link_text=f"{reg.model_name} version {reg.version}",
            description="The version this flow run registered (MLflow)",
        )


def _short(v: Any) -> Any:
    return round(v, 4) if isinstance(v, float) else v


def validation_markdown(val: dict[str, Any], paths: C.Paths) -> str:
    sample = paths.rejected.read_text().splitlines()[1:11] if paths.rejected.is_file() else []
    reasons = "\n".join(f"| {k} | {v} |" for k, v in sorted(val["reject_reasons"].items()))
    return (
        f"## Validation\n\nlayout `{val['layout']}`: **{val['usable']}** usable, "
        f"**{val['rejected']}** rejected of {val['files_seen']} files (reject fraction "
        f"{val['reject_fraction']:.4f}); male fraction {val['male_fraction']}; expectations "
        f"passed: {val['expectations_passed']}\n\n"
        + ("| reason | files |\n|---|---|\n" + reasons + "\n\n" if reasons else "")
        + ("First rejected files:\n\n```\n" + "\n".join(sample) + "\n```\n" if sample else "")
    )


def promotion_markdown(reg: Decision) -> str:
    before = reg.champion_before
    if before.version is None:
        was = "none yet (this is the first candidate judged)"
    elif before.accuracy is None:
        was = f"version {before.version}"
    else:
        was = f"version {before.version} (test accuracy {before.accuracy:.4f} on the same split)"
    after = reg.champion_after
    return (
        f"## Promotion: version {reg.version} **{reg.decision}**\n\n"
        f"* candidate: version {reg.version}, test accuracy {reg.candidate.accuracy:.4f}\n"
        f"* champion before: {was}\n"
        f"* champion after: {f'version {after}' if after else 'none'}\n\n"
        "| check | verdict | detail |\n|---|---|---|\n"
        + "".join(
            f"| {c.name} | {'pass' if c.passed else '**FAIL**'} | {c.summary} |\n"
            for c in reg.checks
        )
    )


def registry_url(version: str) -> str:
    from genderclf.tracking.setup import MODEL_NAME, ui_link

    return ui_link(f"models/{MODEL_NAME}/versions/{version}")


def prefect_flow_run_url(flow_run_id: str) -> str | None:
    """The flow run's page in the Prefect UI, when a Prefect server with a UI is known."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    ui = settings.ui_url or (
        str(settings.api.url).removesuffix("/api") if settings.api.url else None
    )
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}" if ui else None


@task(name="mlflow-run")
def open_mlflow_run(flow_run_id: str, flow_run_name: str) -> tuple[str, str]:
    """The MLflow run this flow run's stages log into, and its link artifact."""
    run_id, url = start_flow_run(flow_run_id, flow_run_name, prefect_flow_run_url(flow_run_id))
    create_link_artifact(
        key="mlflow-run",
        link=url,
        link_text=f"MLflow run {run_id}",
        description="Every stage of this flow run logs into this MLflow run",
    )
    get_run_logger().info("MLflow run: %s", url)
    return run_id, url


@flow(name="gender-pipeline", log_prints=True)
def gender_pipeline(
    overrides: dict[str, Any] | None = None,
    train_on: str = "local",
    repo: str | None = None,
    lock_timeout: float = 600.0,
    approval_timeout: float = 7 * 24 * 3600.0,
) -> dict[str, Any]:
    """Run every stage of dvc.yaml through DVC, in DVC's order.

    Args:
        overrides: `{"train.lr_head": 0.002, ...}`: validated, then written to params.yaml.
        train_on: `local`, or a deployment name (e.g. `train/gpu`) to train on a worker.
        repo: the workspace (default: this checkout).
        lock_timeout: seconds to wait for another run on the same workspace.
        approval_timeout: with `register.approval: manual`, seconds to wait for a person.

    Returns:
        {stage: "ran" | "skipped"} plus the MLflow run id and URL.
    """
    from prefect.runtime import flow_run

    logger = get_run_logger()
    root = Path(repo).resolve() if repo else REPO
    params_file = root / C.PATHS.params
    # The stages run in `root` and default to its sqlite store; so does the flow.
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    with workspace_lock(root, lock_timeout):
        # Before any stage runs: a bad override or params file is a SettingsError here,
        # and params.yaml is left as it was.
        if overrides:
            apply_overrides(params_file, overrides)
            logger.info("overrides written to %s: %s", params_file, overrides)
        else:
            C.load_settings(params_file)
        order = dvc.stage_order(root)
        summary: dict[str, Any] = {}
        push_hint = False
        # Stages DVC runs every time (download: a cheap check of the source) run first, and
        # the plan is made after them: an unchanged source leaves the rest up to date.
        first = [s for s, up in order if not up and s in dvc.always_changed(root)]
        for stage in first:
            result, summary[stage] = _run_stage(stage, root)
            push_hint = push_hint or (result["push_hint"] and summary[stage] == "ran")
        todo = plan(order, dvc.stale_stages(root) - set(first))
        run_id = None
        if any(todo.values()):  # an up-to-date pipeline makes no (empty) MLflow run
            run_id, url = open_mlflow_run(str(flow_run.id), str(flow_run.name))
            os.environ[RUN_ID_VARIABLE] = run_id  # the train stage's process adopts this run
            summary.update(mlflow_run_id=run_id, mlflow_run_url=url)
        try:
            for stage, _upstream in order:
                if stage in first:
                    continue
                if not todo[stage]:
                    skip_stage.with_options(task_run_name=f"{stage} (up to date)")(stage)
                    summary[stage] = "skipped"
                    continue
                if stage == "train" and train_on != "local":
                    from flows.train import train_remotely

                    summary[stage] = train_remotely(root, train_on, run_id)
                    continue
                result, summary[stage] = _run_stage(stage, root)
                push_hint = push_hint or result["push_hint"]
        finally:
            if run_id:
                os.environ.pop(RUN_ID_VARIABLE, None)
                finish_flow_run(run_id)
        if push_hint:
            logger.info(PUSH_HINT)
        if summary.get("register") == "ran":
            reg = Decision.read(C.PATHS.under(root).register_report)
            if reg.decision == "pending_approval":
                summary["approval"] = await_approval(root, reg, approval_timeout)
    return summary


class Approval(RunInput):
    """What a reviewer answers in the Prefect UI when the flow pauses for approval."""

    approve: bool = False
    reason: str = ""
    reviewer: str = ""


def await_approval(root: Path, reg: Decision, timeout: float) -> dict[str, Any]:
    """Pause the flow run until a person approves or rejects the waiting challenger
    (`register.approval: manual`), then promote it through the gate or record the no."""
    from prefect.flow_runs import pause_flow_run

    logger = get_run_logger()
    version = reg.version
    card = C.PATHS.under(root).model_card
    logger.info(
        "version %s passed the gate and waits for approval: resume this flow run in "
        "the Prefect UI (approve, reason, reviewer)",
        version,
    )
    answer = pause_flow_run(
        wait_for_input=Approval.with_initial_data(
            description=f"## Approve version {version}?\n\n"
            + (card.read_text() if card.is_file() else "")
        ),
        timeout=int(timeout),
    )
    return decide_approval(root, version, answer.approve, answer.reason, answer.reviewer)


@task(name="approval")
def decide_approval(root: Path, version: str, approve: bool, reason: str, reviewer: str) -> dict:
    """Promote an approved challenger (the gate runs again, against today's champion), or
    record the rejection; either way the decision and who made it stay with the version."""
    from genderclf import services

    settings = C.load_settings(root / C.PATHS.params)
    who = reviewer or "unknown reviewer"
    result = services.approve(settings, C.PATHS.under(root), version, approve, reason, who)
    out = {
        "version": version,
        "approved": approve,
        "reviewer": who,
        "reason": reason,
        "moved": result.moved,
    }
    create_markdown_artifact(
        key="approval",
        description=f"Approval of version {version}",
        markdown=f"## Version {version}: {'approved' if approve else 'rejected'} by {who}\n\n"
        f"{reason}\n\nchampion moved: {out['moved']}\n",
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the gender-pipeline flow (Prefect).")
    ap.add_argument(
        "-S",
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param, e.g. -S train.lr_head=0.002 (repeatable)",
    )
    ap.add_argument("--train-on", default="local", help="`local` or a deployment, e.g. train/gpu")
    args = ap.parse_args(argv)
    try:
        overrides = dict(parse_override(s) for s in args.set)
        if overrides:  # a misspelt key: one message here, before Prefect starts a flow run
            C.load_settings(REPO / C.PATHS.params, overrides)
    except C.SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = gender_pipeline(overrides=overrides or None, train_on=args.train_on)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
