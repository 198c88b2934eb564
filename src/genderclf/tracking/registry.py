"""Model Registry: register the candidate, compare with the champion, promote by policy.

Policy (`register` params): the candidate becomes `champion` only if its test accuracy is
at least `register.min_accuracy` and it beats the current champion, evaluated on the
same test split, by more than zero and at least `register.min_improvement`. An equal
score keeps the champion (no churn). The first model that meets the floor becomes
champion. `challenger` always points at the newest candidate.

Every alias move is recorded on the model versions as tags (who, when, from, to), so the
history survives later moves.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from genderclf.tracking.setup import CHALLENGER, CHAMPION, MODEL_NAME, call_with_retries

log = logging.getLogger(__name__)


@dataclass
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)


_TOLERANCE = 1e-9


def decide(candidate_acc: float, champion_acc: float | None, min_accuracy: float,
           min_improvement: float) -> Decision:  # fmt: skip
    """The promotion policy as a pure function (see module docstring)."""
    if candidate_acc < min_accuracy:
        return Decision(False, [f"accuracy {candidate_acc:.4f} is below register.min_accuracy "
                                f"{min_accuracy:.4f}"])  # fmt: skip
    if champion_acc is None:
        return Decision(True, [f"no champion yet and accuracy {candidate_acc:.4f} meets the floor "
                               f"{min_accuracy:.4f}"])  # fmt: skip
    delta = candidate_acc - champion_acc
    # Accuracies are ratios of counts; in binary floating point 0.94 - 0.92 is 0.0199999...
    # Compare with a tolerance far below one image, so "at least" means at least.
    if delta <= _TOLERANCE or delta < min_improvement - _TOLERANCE:
        return Decision(False, [f"accuracy {candidate_acc:.4f} does not beat the champion's "
                                f"{champion_acc:.4f} by more than 0 and at least "
                                f"register.min_improvement={min_improvement} (delta {delta:+.4f})"])  # fmt: skip
    return Decision(True, [f"accuracy {candidate_acc:.4f} beats the champion's {champion_acc:.4f} "
                           f"by {delta:+.4f} (>= register.min_improvement={min_improvement})"])  # fmt: skip


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def find_or_register(
    client,
    run_id: str,
    model_uri: str,
    tags: dict[str, str],
    retries: int,
    what: str = "MLflow model registry",
):
    """The version registered from `run_id`, registering it only if none exists yet."""
    import mlflow

    def existing():
        try:
            return client.search_model_versions(f"name='{MODEL_NAME}' and run_id='{run_id}'")
        except Exception as err:  # registered model not created yet
            if "RESOURCE_DOES_NOT_EXIST" in str(getattr(err, "error_code", "")):
                return []
            raise

    found = call_with_retries(existing, retries, 1.0, what)
    if found:
        mv = sorted(found, key=lambda v: int(v.version))[0]
        log.info(
            "register: run %s is already version %s; not registering again", run_id, mv.version
        )
        return mv, False
    mv = call_with_retries(lambda: mlflow.register_model(model_uri, MODEL_NAME, tags=tags),
                           retries, 1.0, what)  # fmt: skip
    return mv, True


def current_alias(client, alias: str):
    """The version `alias` points at, or None when the alias or the model does not exist.

    Any other failure (server down, HTTP 5xx) raises: reading "no champion" from an
    unreachable server would promote a candidate without comparing it.
    """
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(MODEL_NAME, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def move_alias(client, alias: str, version: str, reason: str) -> dict[str, Any]:
    """Point `alias` at `version` and record the move on both versions."""
    prev = current_alias(client, alias)
    # str(): some stores return the version as an int; records and comparisons use strings.
    prev_version = str(prev.version) if prev else None
    move = {"alias": alias, "from": prev_version, "to": version,
            "by": _who(), "at": _now(), "reason": reason[:400]}  # fmt: skip
    client.set_registered_model_alias(MODEL_NAME, alias, version)
    client.set_model_version_tag(MODEL_NAME, version, f"alias.{alias}.set", json.dumps(move))
    if prev_version is not None and prev_version != version:
        client.set_model_version_tag(
            MODEL_NAME, prev_version, f"alias.{alias}.removed", json.dumps(move)
        )
    client.set_registered_model_tag(MODEL_NAME, f"last_move.{alias}", json.dumps(move))
    return move


LOCK_MODEL = f"{MODEL_NAME}.promotion-lock"


@contextlib.contextmanager
def promotion_lock(client, where: str, timeout: float = 300.0, stale_after: float = 900.0):
    """Mutual exclusion between register stages while they re-check and move `champion`.

    The lock is a registered model named `gender-classifier.promotion-lock`: creating a
    registered model is atomic in every MLflow store (a second create fails with
    RESOURCE_ALREADY_EXISTS), and every register already talks to the same registry. It
    exists only for the few calls of a re-check and alias move. A lock left by a killed
    process is taken over after `stale_after` seconds.

    Raises:
        TrackingError: the lock stayed held by a live holder for `timeout` seconds.
    """
    from mlflow.exceptions import MlflowException

    from genderclf.tracking.setup import TrackingError

    deadline = time.monotonic() + timeout
    while True:
        try:
            client.create_registered_model(
                LOCK_MODEL, tags={"holder": _who(), "since": f"{time.time():.3f}"},
                description="held by `genderclf register` while it moves the champion alias",
            )  # fmt: skip
            break
        except MlflowException as err:
            if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
                raise
        try:
            held = client.get_registered_model(LOCK_MODEL)
        except MlflowException:
            continue  # released meanwhile
        since = float(held.tags.get("since", "0") or 0)
        if time.time() - since > stale_after:
            log.warning("register: taking over a stale promotion lock held by %s",
                        held.tags.get("holder"))  # fmt: skip
            with contextlib.suppress(MlflowException):
                client.delete_registered_model(LOCK_MODEL)
            continue
        if time.monotonic() > deadline:
            raise TrackingError(
                f"{where}: the promotion lock (registered model {LOCK_MODEL}) has been held "
                f"by {held.tags.get('holder')} for {time.time() - since:.0f}s; if no other "
                "register is running, delete that registered model and run register again"
            )
        time.sleep(0.2)
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(LOCK_MODEL)


def champion_accuracy(client, champion, prepared_dir: Path, batch_size: int) -> float:
    """Evaluate the champion on the same prepared test split as the candidate."""
    from genderclf.model.evaluate import predict_split
    from genderclf.predict import load_classifier

    model = load_classifier(f"models:/{MODEL_NAME}/{champion.version}").model
    _, y, p = predict_split(model, prepared_dir, "test", batch_size)
    threshold = float(champion.tags.get("threshold", 0.5))
    return float(((p >= threshold).astype(int) == y).mean())


def serving_model_uri(client, run: dict[str, Any], threshold: float, settings,
                      retries: int, where: str = "MLflow artifact store") -> str:  # fmt: skip
    """The run's servable pyfunc model (`runs:/<id>/model`), logged from its Keras model once.

    Packaging happens here, not in train, because the serving threshold is the one
    evaluation chose. A run that already has it (a re-run of register) is not logged again.
    """
    import tempfile

    import mlflow

    from genderclf.predict import SERVING_CONFIG, ServingConfig
    from genderclf.serving import log_serving_model

    run_id = run["run_id"]
    have = call_with_retries(lambda: client.list_artifacts(run_id, "model/artifacts"),
                             retries, 1.0, where)  # fmt: skip
    if any(Path(a.path).name == SERVING_CONFIG for a in have):
        return f"runs:/{run_id}/model"
    keras_uri = run.get("keras_model_uri") or run["model_uri"]
    config = ServingConfig(int(run.get("image_size", settings.base.image_size)),
                           str(run.get("resize", settings.augment.resize)), float(threshold))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(call_with_retries(
            lambda: mlflow.artifacts.download_artifacts(artifact_uri=keras_uri, dst_path=tmp),
            retries, 1.0, where))  # fmt: skip
        files = sorted(folder.rglob("*.keras"))
        if not files:
            raise FileNotFoundError(f"{keras_uri} holds no .keras file: re-run `dvc repro train`")
        with mlflow.start_run(run_id=run_id):
            return log_serving_model(files[0], config)


def run_register(settings, run_file: Path, eval_file: Path, prepared_dir: Path,
                 report_file: Path, max_rechecks: int = 3) -> dict[str, Any]:  # fmt: skip
    """The register stage; writes `reports/register.json` and returns its content.

    Raises:
        FileNotFoundError: run.json or eval.json missing (names the stage to run).
        TrackingError: the tracking server did not answer after `register.retries` retries,
            or failed mid-stage; the message names the URI, and nothing on disk is touched.
    """
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    from genderclf.tracking.setup import TrackingError, configure, redact

    if not run_file.is_file():
        raise FileNotFoundError(f"{run_file} not found: run `dvc repro train`")
    if not eval_file.is_file():
        raise FileNotFoundError(f"{eval_file} not found: run `dvc repro evaluate`")
    cfg = settings.registry
    run = json.loads(run_file.read_text())
    metrics = json.loads(eval_file.read_text())
    uri = configure(cfg.retries)
    where = f"MLflow model registry at {uri}"
    try:
        return _register(settings, run, metrics, prepared_dir, report_file, where, max_rechecks)
    except (MlflowException, RequestException) as err:
        # A call outside the retried ones failed (the server went away mid-stage). Nothing
        # on disk is touched, and a re-run finds the version already registered from this
        # run instead of adding a second one.
        raise TrackingError(
            f"{where} failed during the register stage: {redact(str(err))[:300]}. The trained "
            f"model (run {run.get('run_id')}) and {eval_file} are kept; run the stage again when "
            "the server answers (it reuses the version registered from this run)."
        ) from None


def _register(settings, run: dict[str, Any], metrics: dict[str, Any], prepared_dir: Path,
              report_file: Path, where: str, max_rechecks: int) -> dict[str, Any]:  # fmt: skip
    from mlflow import MlflowClient

    from genderclf.data.fsutil import write_json

    cfg = settings.registry
    client = MlflowClient()

    def call(fn):
        return call_with_retries(fn, cfg.retries, 1.0, where)

    acc = float(metrics["accuracy"])
    tags = {"accuracy": f"{acc:.6f}", "threshold": f"{metrics['threshold']:.6f}",
            "f1": f"{metrics['f1']:.6f}", "run_id": run["run_id"]}  # fmt: skip
    model_uri = serving_model_uri(client, run, metrics["threshold"], settings, cfg.retries,
                                  where)  # fmt: skip
    mv, created = find_or_register(client, run["run_id"], model_uri, tags, cfg.retries,
                                   where)  # fmt: skip
    version = str(mv.version)
    call(lambda: client.set_registered_model_alias(MODEL_NAME, CHALLENGER, version))
    moves: list[dict[str, Any]] = []
    champion_acc = None
    champion_version = None
    decision = Decision(False, ["not evaluated"])
    for _ in range(max_rechecks):
        champ = call(lambda: current_alias(client, CHAMPION))
        if champ is not None and str(champ.version) == version and not moves:
            decision = Decision(True, [f"version {version} is already the champion"])
            champion_version, champion_acc = version, acc
            break
        champion_version = str(champ.version) if champ else None
        champion_acc = (champion_accuracy(client, champ, prepared_dir, settings.train.batch_size * 2)
                        if champ else None)  # fmt: skip
        decision = decide(acc, champion_acc, cfg.min_accuracy, cfg.min_improvement)
        if not decision.promote:
            break
        # Re-check and move under the promotion lock (MLflow has no compare-and-set for
        # aliases): another register may have promoted while this one was scoring.
        with promotion_lock(client, where):
            again = call(lambda: current_alias(client, CHAMPION))
            if (str(again.version) if again else None) != champion_version:
                log.info("register: champion changed during evaluation; re-checking")
                continue
            moves.append(move_alias(client, CHAMPION, version, "; ".join(decision.reasons)))
        # MLflow has no compare-and-set for aliases: a concurrent register that passed its
        # own re-check may have moved the alias just after us. Decide again against it.
        now = call(lambda: current_alias(client, CHAMPION))
        if (str(now.version) if now else None) != version:
            log.info("register: champion moved by another run right after ours; re-checking")
            continue
        break
    label = (
        "promoted"
        if decision.promote and moves
        else ("champion" if decision.promote else "rejected")
    )
    call(lambda: client.set_model_version_tag(MODEL_NAME, version, "decision", label))
    call(lambda: client.set_model_version_tag(
        MODEL_NAME, version, "decision_reason", "; ".join(decision.reasons)[:4000]
    ))  # fmt: skip
    after = call(lambda: current_alias(client, CHAMPION))
    report = {
        "model_name": MODEL_NAME,
        "version": version,
        "newly_registered": created,
        "run_id": run["run_id"],
        "model_uri": model_uri,
        "decision": label,
        "reasons": decision.reasons,
        "candidate": {"version": version, "accuracy": acc, "f1": metrics["f1"],
                      "roc_auc": metrics.get("roc_auc"), "threshold": metrics["threshold"]},
        "champion_before": {"version": champion_version, "accuracy": champion_acc},
        "champion_after": str(after.version) if after else None,
        "alias_moves": moves,
        "policy": {"min_accuracy": cfg.min_accuracy, "min_improvement": cfg.min_improvement},
        "at": _now(),
    }  # fmt: skip
    write_json(report_file, report)
    import mlflow

    with mlflow.start_run(run_id=run["run_id"]):
        mlflow.log_artifact(str(report_file), "registry")
        mlflow.set_tags({"registry.version": version, "registry.decision": label})
    return report
