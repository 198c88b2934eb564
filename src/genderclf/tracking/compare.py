"""`genderclf compare`: registered versions (or recent runs) side by side."""

from __future__ import annotations

from typing import Any

from genderclf.console import render_table
from genderclf.tracking.setup import CHAMPION, EXPERIMENT, MODEL_NAME, configure, require_store

METRICS = ("test/accuracy", "test/f1", "test/roc_auc", "test/ece")


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))


def _differing(param_sets: list[dict[str, str]]) -> list[str]:
    keys = sorted(set().union(*param_sets)) if param_sets else []
    return [k for k in keys if len({p.get(k) for p in param_sets}) > 1]


def _table(lead_headers: list[str], runs: list[Any], lead: list[list[str]]) -> str:
    diff = _differing([r.data.params for r in runs])
    headers = [*lead_headers, *METRICS, "data_checksum", *diff]
    rows = [
        [
            *first,
            *(_fmt(r.data.metrics.get(k)) for k in METRICS),
            r.data.tags.get("data_checksum", "-")[:19],
            *(r.data.params.get(k, "-") for k in diff),
        ]
        for first, r in zip(lead, runs, strict=True)
    ]
    return render_table(headers, rows, right=list(METRICS))


def aliases_by_version(client) -> dict[str, list[str]]:
    """{version: [alias, ...]}. `search_model_versions` leaves `aliases` empty, so the
    registered model's own alias map is the source."""
    model = client.get_registered_model(MODEL_NAME)
    out: dict[str, list[str]] = {}
    for alias, version in sorted((model.aliases or {}).items()):
        out.setdefault(str(version), []).append(alias)
    return out


def compare_versions() -> str:
    """All versions of `gender-classifier`, newest first, the champion marked with `*`."""
    from mlflow import MlflowClient

    require_store("registered versions to compare")
    configure()
    client = MlflowClient()
    versions = sorted(
        client.search_model_versions(f"name='{MODEL_NAME}'"), key=lambda v: -int(v.version)
    )
    if not versions:
        return f"no versions of {MODEL_NAME} registered yet: run `dvc repro` (or `make demo`)"
    aliases = aliases_by_version(client)
    runs = [client.get_run(v.run_id) for v in versions]
    lead = [
        [
            ("*" if CHAMPION in aliases.get(str(v.version), []) else " ") + str(v.version),
            ",".join(aliases.get(str(v.version), [])) or "-",
            v.tags.get("decision", "-"),
        ]
        for v in versions
    ]
    return _table(["version", "aliases", "decision"], runs, lead) + "\n(* = champion)"


def compare_runs(n: int) -> str:
    """The `n` most recent runs of the experiment."""
    import mlflow

    require_store("runs to compare")
    configure()
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    runs = (
        []
        if exp is None
        else mlflow.search_runs(
            [exp.experiment_id],
            max_results=n,
            order_by=["attributes.start_time DESC"],
            output_format="list",
        )
    )
    # a run no stage logged into (a flow run that failed at once) says nothing
    runs = [r for r in runs if r.data.params or r.data.metrics or "registry.version" in r.data.tags]
    if not runs:
        return f"experiment {EXPERIMENT!r} has no runs yet"
    lead = [
        [r.info.run_id[:8], r.info.status, r.data.tags.get("registry.version", "-")] for r in runs
    ]
    return _table(["run", "status", "version"], runs, lead)
