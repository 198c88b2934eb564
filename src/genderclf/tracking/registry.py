"""The MLflow Model Registry behind the register stage: versions, aliases, promotion lock.

`MlflowRegistry` is what promotion asks of a registry (`genderclf.promotion.Registry`):
find the run that trained a model, register its servable model once, read and move the
`champion` alias under a lock, load a version for re-scoring, and keep the decision with
the version and the run. `open_registry` is the one way the commands and the flows get
one, with a failing server explained in one line.

Every alias move is recorded on the model versions as tags (who, when, from, to, why), so
the history survives later moves.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from genderclf.contracts import Evaluation, TrainedModel, TrainingRun
from genderclf.inference import ServingConfig
from genderclf.tracking.setup import (
    CHALLENGER,
    CHAMPION,
    MODEL_NAME,
    TrackingError,
    call_with_retries,
    configure,
    redact,
)

log = logging.getLogger(__name__)


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
    mv = call_with_retries(
        lambda: mlflow.register_model(model_uri, MODEL_NAME, tags=tags), retries, 1.0, what
    )
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
    move = {
        "alias": alias,
        "from": prev_version,
        "to": version,
        "by": _who(),
        "at": _now(),
        "reason": reason[:400],
    }
    client.set_registered_model_alias(MODEL_NAME, alias, version)
    client.set_model_version_tag(MODEL_NAME, version, f"alias.{alias}.set", json.dumps(move))
    if prev_version is not None and prev_version != version:
        client.set_model_version_tag(
            MODEL_NAME, prev_version, f"alias.{alias}.removed", json.dumps(move)
        )
    client.set_registered_model_tag(MODEL_NAME, f"last_move.{alias}", move_text(move))
    return move


def move_text(move: dict[str, Any]) -> str:
    """The registered model's `last_move.<alias>` tag: one short line (the first reason).
    The whole record (JSON, what rollback reads) stays on the versions' `alias.<alias>.set`
    tags."""
    was = f"was version {move['from']}" if move["from"] else "first"
    why = move["reason"].split("; ")[0]  # the first reason; all of them are on the version
    why = why if len(why) <= 120 else why[:119] + "…"
    return f"version {move['to']} ({was}), by {move['by']} at {move['at']}: {why}"


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

    deadline = time.monotonic() + timeout
    while True:
        try:
            client.create_registered_model(
                LOCK_MODEL,
                tags={"holder": _who(), "since": f"{time.time():.3f}"},
                description="held by `genderclf register` while it moves the champion alias",
            )
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
            log.warning(
                "register: taking over a stale promotion lock held by %s", held.tags.get("holder")
            )
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


SERVING_MODEL_TAG = "genderclf.serving_model_id"
# The reference statistics of `genderclf drift`: an artifact of the version's run, named
# on the version by this tag (so a drift check needs no training images).
REFERENCE_DIR = "reference"
REFERENCE_TAG = "genderclf.reference"


def serving_model_uri(
    client,
    run: TrainingRun,
    config: ServingConfig,
    example: bytes,
    retries: int,
    where: str = "MLflow artifact store",
) -> str:
    """The run's servable pyfunc model (`models:/<model_id>`), logged from its Keras model once.

    Packaging happens at registration, not in train, because the serving threshold is the
    one evaluation chose. A run that already has it (a re-run of register) is not logged
    again: the run's `genderclf.serving_model_id` tag names it.
    """
    import mlflow

    from genderclf.tracking.serving import log_serving_model

    run_id = run.run_id
    tags = call_with_retries(lambda: client.get_run(run_id).data.tags, retries, 1.0, where)
    if tags.get(SERVING_MODEL_TAG):
        return f"models:/{tags[SERVING_MODEL_TAG]}"
    keras_uri = run.keras_model_uri
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(
            call_with_retries(
                lambda: mlflow.artifacts.download_artifacts(artifact_uri=keras_uri, dst_path=tmp),
                retries,
                1.0,
                where,
            )
        )
        files = sorted(folder.rglob("*.keras"))
        if not files:
            raise FileNotFoundError(f"{keras_uri} holds no .keras file: re-run `dvc repro train`")
        with mlflow.start_run(run_id=run_id):
            info = log_serving_model(files[0], config, example)
            mlflow.set_tag(SERVING_MODEL_TAG, info.model_id)
    return info.model_uri


MODEL_DESCRIPTION = (
    "Face-image gender classifier: P(male) for a face photo, a binary label of presented "
    "appearance as annotated in CelebA, not anyone's gender identity. Versions come from "
    "`genderclf register` (the pipeline's last stage); `champion` is the served version, "
    "`challenger` the newest candidate. Each version's description says what the promotion "
    "gate decided and why."
)


class MlflowRegistry:
    """The `gender-classifier` registered model, for the register stage.

    Every call goes through `call_with_retries` (`register.retries`), and the champion
    is re-checked and moved under `promotion_lock`: MLflow has no compare-and-set for
    aliases.
    """

    name = MODEL_NAME

    def __init__(self, retries: int):
        self.retries = retries
        self._client = None
        self.where = "MLflow model registry"

    @property
    def client(self):
        """The MLflow client, connected (and the store checked) on first use."""
        if self._client is None:
            from mlflow import MlflowClient

            self.where = f"MLflow model registry at {configure(self.retries)}"
            self._client = MlflowClient()
        return self._client

    def _call(self, fn):
        return call_with_retries(fn, self.retries, 1.0, self.where)

    def training_run(self, model: TrainedModel, record: Path) -> TrainingRun:
        """The run that logged `model` (`tracking.runs.training_run`)."""
        from genderclf.tracking.runs import training_run

        self.client  # noqa: B018  (connects: configure() points MLflow at the store)
        return self._call(lambda: training_run(model, record))

    def register(
        self, run: TrainingRun, evaluation: Evaluation, serving: ServingConfig, example: bytes
    ) -> tuple[str, bool, str]:
        """(version, newly registered, model URI); `challenger` points at the version."""
        tags = {
            "accuracy": f"{evaluation.accuracy:.6f}",
            "threshold": f"{serving.threshold:.6f}",
            "f1": f"{evaluation.f1:.6f}",
            "run_id": run.run_id,
            "calibration": json.dumps(list(serving.calibration)),
        }
        uri = serving_model_uri(self.client, run, serving, example, self.retries, self.where)
        mv, created = find_or_register(self.client, run.run_id, uri, tags, self.retries, self.where)
        version = str(mv.version)
        self._call(lambda: self.client.set_registered_model_alias(MODEL_NAME, CHALLENGER, version))
        return version, created, uri

    def champion(self) -> _Version | None:
        mv = self._call(lambda: current_alias(self.client, CHAMPION))
        return None if mv is None else _version(mv)

    def version(self, version: str) -> _Version:
        return _version(self._call(lambda: self.client.get_model_version(MODEL_NAME, version)))

    def serve(self, version: str, images: list[bytes]) -> list[float]:
        return serve_in_fresh_process(f"models:/{MODEL_NAME}/{version}", images)

    def load(self, version: str) -> Any:
        from genderclf.tracking.serving import load_classifier

        return load_classifier(f"models:/{MODEL_NAME}/{version}").model

    def record_approval(self, version: str, approve: bool, reason: str, who: str) -> None:
        """A person's yes or no to a waiting challenger, on the version (tags, description)."""
        at = datetime.now(UTC).isoformat(timespec="seconds")
        verdict = "approved" if approve else "rejected"
        c = self.client
        record = json.dumps({"verdict": verdict, "by": who, "at": at, "reason": reason[:400]})
        self._call(lambda: c.set_model_version_tag(MODEL_NAME, version, "approval", record))
        mv = self._call(lambda: c.get_model_version(MODEL_NAME, version))
        note = f"{verdict.capitalize()} by {who} ({at}): {reason}\n\n"  # plain: the list shows it
        self._call(
            lambda: c.update_model_version(
                MODEL_NAME, version, (note + (mv.description or ""))[:5000]
            )
        )

    def previous_champion(self) -> tuple[str, str] | None:
        """(the champion now, the one it replaced), from the recorded alias history."""
        now = self._call(lambda: current_alias(self.client, CHAMPION))
        if now is None:
            return None
        move = json.loads(now.tags.get(f"alias.{CHAMPION}.set", "{}"))
        return (str(now.version), move["from"]) if move.get("from") else None

    def promote(self, version: str, expected: str | None, reason: str) -> dict[str, Any] | None:
        with promotion_lock(self.client, self.where):
            again = self._call(lambda: current_alias(self.client, CHAMPION))
            if (str(again.version) if again else None) != expected:
                return None
            return self._call(lambda: move_alias(self.client, CHAMPION, version, reason))

    def record(
        self,
        run_id: str,
        version: str,
        decision: str,
        reasons: list[str],
        report_file: Path,
        description: str = "",
        card_file: Path | None = None,
        reference_file: Path | None = None,
    ) -> None:
        import mlflow

        c = self.client
        self._call(lambda: c.set_model_version_tag(MODEL_NAME, version, "decision", decision))
        self._call(
            lambda: c.set_model_version_tag(
                MODEL_NAME, version, "decision_reason", "; ".join(reasons)[:4000]
            )
        )
        if description:
            self._call(lambda: c.update_model_version(MODEL_NAME, version, description[:5000]))
        model = self._call(lambda: c.get_registered_model(MODEL_NAME))
        if not model.description:
            self._call(lambda: c.update_registered_model(MODEL_NAME, MODEL_DESCRIPTION))
        with mlflow.start_run(run_id=run_id):
            mlflow.log_artifact(str(report_file), "registry")
            if card_file is not None:
                mlflow.log_artifact(str(card_file), "registry")
            if reference_file is not None:
                mlflow.log_artifact(str(reference_file), REFERENCE_DIR)
            mlflow.set_tags({"registry.version": version, "registry.decision": decision})
        if reference_file is not None:
            uri = f"runs:/{run_id}/{REFERENCE_DIR}/{Path(reference_file).name}"
            self._call(lambda: c.set_model_version_tag(MODEL_NAME, version, REFERENCE_TAG, uri))

    @contextlib.contextmanager
    def failures_explained(self, during: str, kept: str) -> Iterator[None]:
        """One TrackingError for a server that went away mid-command (after the retries):
        what failed `during` what, what is `kept`, and to run it again."""
        from mlflow.exceptions import MlflowException
        from requests.exceptions import RequestException

        try:
            yield
        except (MlflowException, RequestException) as err:
            raise TrackingError(
                f"{self.where} failed during {during}: {redact(str(err))[:300]}. {kept}; run "
                "it again when the server answers."
            ) from None


@contextlib.contextmanager
def open_registry(retries: int, during: str, kept: str) -> Iterator[MlflowRegistry]:
    """The `gender-classifier` registry for one command (`register.retries`), with a
    server that fails mid-way explained in one line (`MlflowRegistry.failures_explained`).

    Args:
        during: what is running, e.g. "the register stage" or "`genderclf promote 3`".
        kept: what is left as it was, e.g. "nothing was moved".
    """
    registry = MlflowRegistry(retries)
    with registry.failures_explained(during, kept):
        yield registry


@dataclass(frozen=True)
class _Version:
    version: str
    threshold: float
    calibration: tuple[float, float]


def _version(mv) -> _Version:
    # Versions registered before calibration existed have no tag: their scores are as is.
    cal = json.loads(mv.tags.get("calibration", "[1.0, 0.0]"))
    return _Version(str(mv.version), float(mv.tags.get("threshold", 0.5)), (cal[0], cal[1]))


# Downloaded into a folder it removes: without `dst_path` MLflow keeps every download in a
# new temporary folder for good (15 MB a model, one per registration).
_SERVE = """
import base64, json, sys, tempfile
import mlflow, pandas as pd
images = [base64.b64decode(x) for x in json.load(sys.stdin)]
with tempfile.TemporaryDirectory(prefix="genderclf-serve-") as dst:
    model = mlflow.pyfunc.load_model(sys.argv[1], dst_path=dst)
    out = model.predict(pd.DataFrame({"image": images}))
print("GENDERCLF-ANSWER " + json.dumps([None if v is None else float(v) for v in out["p_male"]]))
"""


def serve_in_fresh_process(
    model_uri: str, images: list[bytes], timeout: float = 600
) -> list[float]:
    """P(male) for `images` from `model_uri` loaded through MLflow's pyfunc loader in a new
    Python process (nothing of this process's imports or state helps it load).

    Raises:
        RuntimeError: it did not load or answer; the message holds the end of its output.
    """
    import base64
    import subprocess
    import sys

    from genderclf.tracking.setup import tracking_uri

    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "-c", _SERVE, model_uri],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        input=json.dumps([base64.b64encode(b).decode() for b in images]),
    )
    answer = [ln for ln in proc.stdout.splitlines() if ln.startswith("GENDERCLF-ANSWER ")]
    if proc.returncode != 0 or not answer:
        tail = redact((proc.stderr or proc.stdout).strip())[-600:]
        raise RuntimeError(f"exit {proc.returncode}: {tail}")
    values = json.loads(answer[-1].removeprefix("GENDERCLF-ANSWER "))
    if any(v is None for v in values):
        raise RuntimeError(f"no answer for {sum(v is None for v in values)} of the images")
    return values
