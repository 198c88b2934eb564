"""The register stage: add the candidate to the model registry; promote it only if it wins.

Policy (`register` params): the candidate becomes `champion` only if its test accuracy is
at least `register.min_accuracy` and it beats the current champion, scored on the same
test split, by more than zero and at least `register.min_improvement`. An equal score
keeps the champion (no churn). The first model that meets the floor becomes champion.
`challenger` always points at the newest candidate.

The registry itself (MLflow) is given as an object (`genderclf.tracking.registry`), so
the policy here reads in one place and imports no MLflow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from genderclf.config import Paths, Settings
from genderclf.data.tfrecords import first_record
from genderclf.io import read_json, write_json
from genderclf.model.scoring import predict_split

log = logging.getLogger(__name__)

# Accuracies are ratios of counts; in binary floating point 0.94 - 0.92 is 0.0199999...
# Compare with a tolerance far below one image, so "at least" means at least.
_TOLERANCE = 1e-9


@dataclass
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)


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
    if delta <= _TOLERANCE or delta < min_improvement - _TOLERANCE:
        return Decision(False, [f"accuracy {candidate_acc:.4f} does not beat the champion's "
                                f"{champion_acc:.4f} by more than 0 and at least "
                                f"register.min_improvement={min_improvement} (delta {delta:+.4f})"])  # fmt: skip
    return Decision(True, [f"accuracy {candidate_acc:.4f} beats the champion's {champion_acc:.4f} "
                           f"by {delta:+.4f} (>= register.min_improvement={min_improvement})"])  # fmt: skip


class Version(Protocol):
    version: str
    threshold: float  # the version's own decision threshold


class Registry(Protocol):
    """What the stage needs from a model registry (`tracking.registry.MlflowRegistry`)."""

    name: str  # the registered model

    def register(self, run: dict[str, Any], metrics: dict[str, Any],
                 serving: dict[str, Any]) -> tuple[str, bool, str]:  # fmt: skip
        """Add the run's servable model as a version (once per run); point `challenger`
        at it. `serving` is what inference must repeat (image size, resize, threshold).
        Returns (version, newly registered, the registered model's URI)."""

    def champion(self) -> Version | None:
        """The version `champion` points at, or None when there is none."""

    def load(self, version: str) -> Any:
        """The version's Keras model."""

    def promote(self, version: str, expected: str | None, reason: str) -> dict[str, Any] | None:
        """Move `champion` to `version` if it still points at `expected` (None: nowhere).
        Returns the recorded move, or None when the champion changed meanwhile."""

    def record(self, run_id: str, version: str, decision: str, reasons: list[str],
               report_file: Any, description: str) -> None:  # fmt: skip
        """Keep the decision with the version (tags, `description`) and the run (tags,
        the report file)."""


def _champion_accuracy(registry: Registry, champ: Version, paths: Paths, batch: int) -> float:
    """The champion scored on the candidate's prepared test split, at its own threshold."""
    _, y, p = predict_split(registry.load(champ.version), paths.prepared, "test", batch)
    return float(((p >= champ.threshold).astype(int) == y).mean())


def run(settings: Settings, paths: Paths, registry: Registry,
        max_rechecks: int = 3) -> dict[str, Any]:  # fmt: skip
    """Register the trained model, decide, move the aliases; write `reports/register.json`.

    Returns:
        The report (version, decision, reasons, champion before and after, alias moves).

    Raises:
        FileNotFoundError: run.json or eval.json missing (names the stage to run).
    """
    cfg = settings.registry
    run_info = read_json(paths.run, "run `dvc repro train`")
    metrics = read_json(paths.eval_metrics, "run `dvc repro evaluate`")
    acc = float(metrics["accuracy"])
    serving = {"image_size": int(run_info.get("image_size", settings.base.image_size)),
               "resize": str(run_info.get("resize", settings.augment.resize)),
               "threshold": float(metrics["threshold"]), "predict": settings.predict.model_dump(),
               "example": first_record(paths.prepared, "test")[0]}  # a real test image  # fmt: skip
    version, created, model_uri = registry.register(run_info, metrics, serving)
    moves: list[dict[str, Any]] = []
    champion_acc = champion_version = None
    decision = Decision(False, ["not evaluated"])
    for _ in range(max_rechecks):
        champ = registry.champion()
        if champ is not None and champ.version == version and not moves:
            decision = Decision(True, [f"version {version} is already the champion"])
            champion_version, champion_acc = version, acc
            break
        champion_version = champ.version if champ else None
        champion_acc = (_champion_accuracy(registry, champ, paths, settings.train.batch_size * 2)
                        if champ else None)  # fmt: skip
        decision = decide(acc, champion_acc, cfg.min_accuracy, cfg.min_improvement)
        if not decision.promote:
            break
        move = registry.promote(version, champion_version, "; ".join(decision.reasons))
        if move is None:
            log.info("register: champion changed during evaluation; re-checking")
            continue
        moves.append(move)
        # A concurrent register that passed its own re-check may have moved the alias
        # just after us: decide again against that one.
        now = registry.champion()
        if (now.version if now else None) != version:
            log.info("register: champion moved by another run right after ours; re-checking")
            continue
        break
    label = "promoted" if decision.promote and moves else ("champion" if decision.promote
                                                           else "rejected")  # fmt: skip
    after = registry.champion()
    report = {
        "model_name": registry.name,
        "version": version,
        "newly_registered": created,
        "run_id": run_info["run_id"],
        "model_uri": model_uri,
        "decision": label,
        "reasons": decision.reasons,
        "candidate": {"version": version, "accuracy": acc, "f1": metrics["f1"],
                      "roc_auc": metrics.get("roc_auc"), "threshold": metrics["threshold"]},
        "champion_before": {"version": champion_version, "accuracy": champion_acc},
        "champion_after": after.version if after else None,
        "alias_moves": moves,
        "policy": {"min_accuracy": cfg.min_accuracy, "min_improvement": cfg.min_improvement},
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }  # fmt: skip
    write_json(paths.register_report, report)
    registry.record(run_info["run_id"], version, label, decision.reasons, paths.register_report,
                    describe(report, metrics))  # fmt: skip
    return report


def describe(report: dict[str, Any], metrics: dict[str, Any]) -> str:
    """The version's description: what was decided, why, and its headline numbers."""
    verdict = {"promoted": "Promoted to champion", "champion": "Champion (unchanged)",
               "rejected": "Not promoted (challenger)"}[report["decision"]]  # fmt: skip
    before = report["champion_before"]
    against = ("there was no champion before" if before["version"] is None else
               f"against version {before['version']} (test accuracy {before['accuracy']:.4f} "
               "on the same test split)" if before["accuracy"] is not None else
               f"version {before['version']} was already the champion")  # fmt: skip
    auc = metrics.get("roc_auc")
    return (f"{verdict}: {'; '.join(report['reasons'])}. Decided {against}. Test accuracy "
            f"{metrics['accuracy']:.4f}, F1 {metrics['f1']:.4f}"
            + (f", ROC-AUC {auc:.4f}" if auc is not None else "")
            + f"; threshold {metrics['threshold']:.3f} (chosen on validation). "
            f"Training run {report['run_id']}.")  # fmt: skip
