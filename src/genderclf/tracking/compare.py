"""`genderclf compare`: registered versions (or recent runs) side by side."""

from __future__ import annotations

from typing import Any

from genderclf.tracking.setup import CHAMPION, EXPERIMENT, MODEL_NAME, configure

METRICS = ("test_accuracy", "test_f1", "test_roc_auc", "test_ece")


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))


def _differing(param_sets: list[dict[str, str]]) -> list[str]:
    keys = sorted(set().union(*param_sets)) if param_sets else []
    return [k for k in keys if len({p.get(k) for p in param_sets}) > 1]


def _rows(runs: list[Any], first: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    params = [r.data.params for r in runs]
    diff = _differing(params)
    headers = [*METRICS, "data_checksum", *diff]
    rows = []
    for lead, r in zip(first, runs, strict=True):
        m = r.data.metrics
        rows.append([*lead, *(_fmt(m.get(k)) for k in METRICS),
                     r.data.tags.get("data_checksum", "-")[:19], *(r.data.params.get(k, "-") for k in diff)])  # fmt: skip
    return headers, rows


def compare_versions() -> str:
    """All versions of `gender-classifier`, champion marked with `*`."""
    from mlflow import MlflowClient

    configure()
    client = MlflowClient()
    versions = sorted(
        client.search_model_versions(f"name='{MODEL_NAME}'"), key=lambda v: -int(v.version)
    )
    if not versions:
        return f"no versions of {MODEL_NAME} registered yet: run `dvc repro` (or `make demo`)"
    runs = [client.get_run(v.run_id) for v in versions]
    lead = [[("*" if CHAMPION in (v.aliases or []) else " ") + str(v.version),
             ",".join(v.aliases or []) or "-", v.tags.get("decision", "-")] for v in versions]  # fmt: skip
    headers, rows = _rows(runs, lead)
    return _table(["version", "aliases", "decision", *headers], rows) + "\n(* = champion)"


def compare_runs(n: int) -> str:
    """The `n` most recent runs of the experiment."""
    import mlflow

    configure()
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return f"experiment {EXPERIMENT!r} has no runs yet"
    runs = mlflow.search_runs([exp.experiment_id], max_results=n, order_by=["attributes.start_time DESC"],
                              output_format="list")  # fmt: skip
    if not runs:
        return f"experiment {EXPERIMENT!r} has no runs yet"
    lead = [
        [r.info.run_id[:8], r.info.status, r.data.tags.get("registry.version", "-")] for r in runs
    ]
    headers, rows = _rows(runs, lead)
    return _table(["run", "status", "version", *headers], rows)
