"""MLflow setup in one place, at call time (never at import), plus lineage tags.

Tracking store: `MLFLOW_TRACKING_URI` if set, else `sqlite:///mlflow.db` in the working
directory (the repository root when DVC runs the stages). Artifacts go where the store's
experiment says: local by default, S3 when the server or `MLFLOW_S3_ENDPOINT_URL` says so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from genderclf.config import GenderclfError
from genderclf.io import md5_file, retry

log = logging.getLogger(__name__)

EXPERIMENT = "gender-classification"
# Drift checks (`genderclf drift`, the monitor flow) log here, apart from the training runs.
MONITOR_EXPERIMENT = "gender-classification-monitoring"
MODEL_NAME = "gender-classifier"
CHAMPION = "champion"
CHALLENGER = "challenger"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
EXPERIMENT_DESCRIPTION = (
    "Runs of the genderclf retraining pipeline (DVC stages, often inside a Prefect flow run): "
    "one run per training, with its params, lineage tags (git commit, DVC data hash, data "
    "source), datasets, per-epoch train/ and val/ curves, the test/ and slice/ metrics of "
    "the evaluate stage, its plots, and the Keras model. Registered versions: the "
    "`gender-classifier` model. Drift checks: the `gender-classification-monitoring` experiment."
)
MONITOR_DESCRIPTION = (
    "Drift checks of new image batches against the champion (`genderclf drift`, the Prefect "
    "`monitor` flow): one run per check, tagged with the champion's version, run and model, "
    "its drift/ metrics linked to the champion's LoggedModel, drift.json, summary.md and "
    "drift.png as artifacts."
)
# What the experiment is for, in MLflow's own tag (its experiment-kind selector shows it):
# model development, not a GenAI app. MLflow 3.17's UI still picks the view (GenAI or model
# training) from its global switch, so the links we print say the view (`ui_link`).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
DEFAULT_UI_URL = "http://127.0.0.1:5000"
UI_VIEW = "workflowType=machine_learning"  # the UI's model-training view (see ui_link)
QUIET_MLFLOW_LOGGERS = ("mlflow.store.db.utils", "mlflow.utils.uv_utils", "mlflow.pyfunc")


class TrackingError(GenderclfError, RuntimeError):
    """The tracking server could not be reached or refused a call."""


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def local_artifact_root(uri: str) -> Path | None:
    """Where a local tracking store keeps new experiments' artifacts: `mlruns/` beside a
    SQLite file, the folder of a file store; None for a server (it decides)."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns"
    if uri.startswith("file:"):
        return Path(uri.removeprefix("file://").removeprefix("file:")).resolve()
    if "://" not in uri:
        return Path(uri).resolve()
    return None


def require_store(needed_for: str) -> None:
    """Refuse to look something up in a local SQLite store that does not exist (connecting
    would create an empty `mlflow.db` in whatever folder the command ran in).

    Raises:
        TrackingError: naming the missing file, `needed_for`, and what to do.
    """
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    if not db.is_file():
        how = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "the default"
        raise TrackingError(
            f"no MLflow tracking store at {db.resolve()} ({how}, {uri}), so no "
            f"{needed_for}: run in the checkout that ran the pipeline (`make demo`), or set "
            "MLFLOW_TRACKING_URI to your store"
        )


def ui_url() -> str:
    """The MLflow UI that links (Prefect artifacts, run pages) point at: `MLFLOW_UI_URL` if
    set, else the tracking server when `MLFLOW_TRACKING_URI` is http(s), else `make ui`'s
    http://127.0.0.1:5000 (a local store has no UI of its own). Credentials are dropped."""
    uri = tracking_uri()
    base = os.environ.get("MLFLOW_UI_URL") or (
        uri if uri.startswith(("http://", "https://")) else DEFAULT_UI_URL
    )
    return redact(base).rstrip("/")


def ui_link(route: str) -> str:
    """A page of the MLflow UI (`route`: its address after `#/`), in the model-training view.

    MLflow 3's UI opens every experiment in its GenAI view (traces, "Detect issues") until
    the user picks "Model training" at its top left: that switch, not the experiment's
    `mlflow.experimentKind` tag, decides the view (3.17 and 3.18 alike). The address says it.
    """
    return f"{ui_url()}/#/{route.strip('/')}?{UI_VIEW}"


def redact(uri: str) -> str:
    """Drop credentials from a URI before it is printed, logged or stored."""
    return re.sub(r"//[^/@\s]+@", "//***@", uri)


def configure(retries: int = 3, backoff: float = 1.0) -> str:
    """Point MLflow at the tracking store, create the experiment, check it answers.

    Returns:
        The tracking URI (with any credentials redacted).

    Raises:
        TrackingError: the store did not answer after `retries` retries, naming the URI.
    """
    # Bound MLflow's own HTTP retries so an unreachable server fails in seconds, not minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    if not sys.stderr.isatty():  # MLflow's download bars are frames in a log, not progress
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    # We give every logged model its pip requirements; MLflow still looks for pip (a uv
    # venv has none) for a conda.yaml nobody uses, and warns.
    logging.getLogger("mlflow.utils.environment").setLevel(logging.ERROR)
    # MLflow's INFO lines about its own housekeeping (creating a new store's tables, the
    # uv.lock it copies beside a logged model, checking our input example against our
    # signature) tell a user nothing to act on; its warnings still show.
    for name in QUIET_MLFLOW_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    # The registry follows the tracking store unless the user points it elsewhere.
    # (Calling set_registry_uri would also write MLFLOW_REGISTRY_URI into the environment,
    # where a later configure() would mistake it for the user's choice.)
    if os.environ.get("MLFLOW_REGISTRY_URI"):
        mlflow.set_registry_uri(os.environ["MLFLOW_REGISTRY_URI"])
    call_with_retries(
        lambda: _ensure_experiment(uri),
        retries,
        backoff,
        f"MLflow tracking server at {redact(uri)}",
    )
    return redact(uri)


def _ensure_experiment(uri: str) -> None:
    """Select the experiment, creating it first if needed."""
    import mlflow

    ensure_experiment(EXPERIMENT, EXPERIMENT_DESCRIPTION, uri)
    mlflow.set_experiment(EXPERIMENT)


def ensure_experiment(name: str, description: str, uri: str | None = None) -> str:
    """The id of experiment `name`, created if needed, with its description and its kind,
    model development (`EXPERIMENT_KIND`).

    With a SQLite store the artifacts go next to the database file (`mlruns/` beside it),
    not into whatever folder the first process happened to run in.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = uri or tracking_uri()
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is None:
        local = local_artifact_root(uri) if uri.startswith("sqlite:///") else None
        with contextlib.suppress(MlflowException):  # another process may have just created it
            client.create_experiment(name, artifact_location=local.as_uri() if local else None)
        exp = client.get_experiment_by_name(name)
    wanted = {"mlflow.note.content": description, EXPERIMENT_KIND[0]: EXPERIMENT_KIND[1]}
    for key, value in wanted.items():
        if not exp.tags.get(key):  # a user's own note or choice of view is kept
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def call_with_retries(fn, retries: int, backoff: float, what: str):
    """Call `fn`; retry MLflow and network errors with exponential backoff.

    An answer that says the request itself is wrong (invalid parameter, already exists)
    is raised at once: retrying cannot change it.

    Raises:
        TrackingError: still failing after `retries` retries, naming `what`.
    """
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    def give_up(err: BaseException, calls: int) -> TrackingError:
        return TrackingError(
            f"{what} did not answer after {calls} attempts: {redact(str(err))[:300]}. Check "
            "MLFLOW_TRACKING_URI and that the server is up, then re-run the stage; outputs "
            "already on disk are kept."
        )

    def permanent(err: BaseException) -> bool:
        return getattr(err, "error_code", "") in (
            "INVALID_PARAMETER_VALUE",
            "RESOURCE_ALREADY_EXISTS",
        )

    return retry(
        fn,
        attempts=retries,
        backoff=backoff,
        what=what,
        retry_on=(MlflowException, RequestException, OSError),
        give_up=give_up,
        permanent=permanent,
    )


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def file_md5(path: Path) -> str | None:
    """The MD5 of a file (as DVC hashes it), or None when there is no such file."""
    return md5_file(path) if path.is_file() else None


def dvc_out_hash(stage: str, out: str, lock_file: Path = Path("dvc.lock")) -> str | None:
    """The hash DVC recorded in dvc.lock for one output of a stage (None if not run via DVC)."""
    if not lock_file.is_file():
        return None
    try:
        lock = yaml.safe_load(lock_file.read_text()) or {}
        for o in lock.get("stages", {}).get(stage, {}).get("outs", []):
            if o.get("path") == out:
                return o.get("md5")
    except (yaml.YAMLError, AttributeError):
        return None
    return None


def _pipeline_outputs() -> list[str]:
    """What the pipeline itself writes into a checkout: dvc.lock, the .gitignore files DVC
    keeps, and the output folders (`Paths`). Changes there do not make the code "dirty"."""
    from dataclasses import fields

    from genderclf.config import Paths

    tops = {Path(getattr(Paths(), f.name)).parts[0] for f in fields(Paths)} - {"params.yaml"}
    return ["dvc.lock", "**/.gitignore", ".gitignore", *sorted(tops)]


def git_dirty() -> str:
    """ "true" when tracked code or params differ from the commit, "false", or "unknown"."""
    excludes = [f":(exclude,glob){p}" for p in _pipeline_outputs()]
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", *excludes)
    return "unknown" if status is None else str(bool(status)).lower()


def lineage_tags(params_file: Path, source_file: Path, prepared_dir: str) -> dict[str, str]:
    """Tags that tie a run to its code, data and settings."""
    from genderclf.catalog import location

    commit = _git("rev-parse", "HEAD")
    source: dict[str, Any] = {}
    if source_file.is_file():
        source = json.loads(source_file.read_text())
    tags = {
        "mlflow.source.git.commit": commit or "unknown",
        "git_commit": commit or "unknown",
        "git_dirty": git_dirty() if commit else "unknown",
        "dvc_prepared_md5": dvc_out_hash("augment", prepared_dir) or "unknown",
        "params_md5": file_md5(params_file) or "unknown",
        "data_source": str(source.get("source", "unknown")),
        "data_location": location(source)[0],
        "data_checksum": str(source.get("checksum", "unknown")),
    }
    return {k: redact(v) for k, v in tags.items()}
