"""The register stage: add the candidate to the model registry; promote it only through the gate.

The gate's checks are `genderclf.promotion` (floor, paired, slices, calibration, serving).
The first model that passes becomes champion; `challenger` always points at the newest
candidate. With `register.approval: manual` a passing candidate waits as challenger for a
person (the Prefect flow pauses for it; `genderclf promote` does it by hand).

The registry itself (MLflow) is given as an object (`promotion.Registry`, implemented by
`genderclf.tracking.registry.MlflowRegistry`), so the stage imports no MLflow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from genderclf.config import Paths, Settings
from genderclf.contracts import (
    Candidate,
    Check,
    Decision,
    Evaluation,
    PreparedData,
    Standing,
    TrainedModel,
)
from genderclf.data.tfrecords import first_record
from genderclf.inference import ServingConfig
from genderclf.io import atomic_write
from genderclf.model.card import model_card
from genderclf.promotion import Registry, Scores, Version, gate, summary

log = logging.getLogger(__name__)

POLICY_KEYS = ("min_accuracy", "min_improvement", "alpha", "max_slice_drop", "max_ece", "approval")


@dataclass(frozen=True)
class RegisterReport:
    decision: Decision  # what reports/register.json holds
    report: Path
    card: Path


def evaluated_scores(paths: Paths, evaluation: Evaluation) -> Scores:
    """The candidate's answers as the evaluate stage recorded them (plots/predictions.csv)."""
    f = paths.plots / "predictions.csv"
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found: run `dvc repro evaluate`")
    rows = pd.read_csv(f)
    return Scores(
        rows["path"].tolist(),
        (rows["actual"] == "male").to_numpy().astype(int),
        rows["prob_male"].to_numpy(dtype=float),
        evaluation.threshold_calibrated,
    )


def run(
    settings: Settings, paths: Paths, registry: Registry, max_rechecks: int = 3
) -> RegisterReport:
    """Register the trained model, run the gate, move the aliases; write
    `reports/register.json` and `reports/model_card.md`.

    Raises:
        ContractError / FileNotFoundError: models/model.json, eval.json or the predictions
            missing or stale (names the stage to run).
    """
    model = TrainedModel.read(paths.model_info)
    evaluation = Evaluation.read(paths.eval_metrics)
    cand = evaluated_scores(paths, evaluation)
    data = PreparedData.read(paths.prepared)
    trained_in = registry.training_run(model, paths.run)
    serving = ServingConfig.of(model.input, evaluation, settings.predict.model_dump())
    example = first_record(data, "test")[0]  # a real test image
    version, created, model_uri = registry.register(trained_in, evaluation, serving, example)

    champ, checks, moves = _promote(
        settings, registry, data, paths.splits, version, cand, evaluation, max_rechecks
    )
    decision = Decision(
        model_name=registry.name,
        version=version,
        newly_registered=created,
        run_id=trained_in.run_id,
        model_uri=model_uri,
        decision=_label(checks, champ, version, moves, settings.registry.approval),
        reasons=[c.summary for c in checks if not c.passed] or [summary(checks)],
        checks=checks,
        candidate=Candidate(
            version,
            cand.accuracy,
            evaluation.f1,
            evaluation.roc_auc,
            evaluation.threshold_raw,
            evaluation.ece,
        ),
        champion_before=Standing(
            champ.version if champ else None, _champion_accuracy(checks, champ, version, cand)
        ),
        champion_after=(after.version if (after := registry.champion()) else None),
        alias_moves=moves,
        policy={k: getattr(settings.registry, k) for k in POLICY_KEYS},
        at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    decision.write(paths.register_report)
    card = model_card(paths.source_file, decision, evaluation, model, data)
    atomic_write(paths.model_card, card)
    reference = paths.reference if paths.reference.is_file() else None
    if reference is None:
        log.warning(
            "register: %s missing: `genderclf drift` will have no reference for "
            "version %s (run `dvc repro evaluate`)",
            paths.reference,
            version,
        )
    registry.record(
        trained_in.run_id,
        version,
        decision.decision,
        decision.reasons,
        paths.register_report,
        describe(decision) + "\n\n" + card,
        paths.model_card,
        reference,
    )
    return RegisterReport(decision, paths.register_report, paths.model_card)


def _promote(
    settings: Settings,
    registry: Registry,
    data: PreparedData,
    splits: Path,
    version: str,
    cand: Scores,
    evaluation: Evaluation,
    max_rechecks: int = 3,
) -> tuple[Version | None, list[Check], list[dict[str, Any]]]:
    """Gate the candidate against the champion and move `champion` if it passes, re-checking
    when another register moved it meanwhile. Returns (the champion judged against, the
    checks, the alias moves)."""
    moves: list[dict[str, Any]] = []
    champ: Version | None = None
    checks: list[Check] = []
    for _ in range(max_rechecks):
        champ = registry.champion()
        checks = gate(settings, data, splits, registry, version, cand, evaluation.ece, champ)
        passed = all(c.passed for c in checks)
        if not passed or (champ is not None and champ.version == version):
            break
        if settings.registry.approval == "manual":
            break  # a person decides (`genderclf promote`, or the Prefect flow's pause)
        move = registry.promote(version, champ.version if champ else None, summary(checks))
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
    return champ, checks, moves


def _label(
    checks: list[Check],
    champ: Version | None,
    version: str,
    moves: list[dict[str, Any]],
    approval: str,
) -> str:
    passed = all(c.passed for c in checks)
    if champ is not None and champ.version == version and not moves and passed:
        return "champion"
    if moves:
        return "promoted"
    return "pending_approval" if passed and approval == "manual" else "rejected"


def _champion_accuracy(
    checks: list[Check], champ: Version | None, version: str, cand: Scores
) -> float | None:
    if champ is None:
        return None
    if champ.version == version:
        return cand.accuracy
    paired = next((c for c in checks if c.name == "paired"), None)
    return paired.numbers.get("champion_accuracy") if paired else None


VERDICTS = {
    "promoted": "Promoted to champion",
    "champion": "Champion (unchanged)",
    "pending_approval": "Passed the gate; waiting for approval (challenger)",
    "rejected": "Not promoted (challenger)",
}


def describe(decision: Decision) -> str:
    """The version's description: what was decided, then each check with its numbers.

    Plain text first (the MLflow UI's version list shows the description's start as it
    is, markdown and all); the model card that follows is markdown, for the version page.
    """
    lines = [f"{VERDICTS[decision.decision]}.", ""]
    lines += [f"- {'pass' if c.passed else 'FAIL'} {c.name}: {c.summary}" for c in decision.checks]
    return "\n".join(lines)
