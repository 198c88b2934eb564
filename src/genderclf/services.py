"""What the tools and the flows both do, written once: promote a version through the
gate, record a person's approval, roll back, check a batch for drift.

`genderclf promote`, `rollback` and `drift` (`genderclf.tools`) and the Prefect flows
(`flows/`) call these; each opens the registry through `tracking.registry.open_registry`,
so a server that fails mid-way is one readable line wherever it happens. No stage runs
here and no stage depends on this module: editing it re-runs nothing in `dvc.yaml`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genderclf.config import PATHS, GenderclfError, Paths, Settings
from genderclf.console import quiet_tensorflow
from genderclf.contracts import Check, PreparedData
from genderclf.tracking.registry import MlflowRegistry, open_registry


@dataclass(frozen=True)
class Promotion:
    """What a promotion attempt did: every check of the gate, and the alias move if any."""

    moved: bool
    checks: list[Check]
    move: dict[str, Any] | None  # the recorded move (from, to, by, at, reason)


def promote(
    settings: Settings,
    paths: Paths,
    version: str,
    reason: str,
    *,
    force: bool = False,
    by: str = "",
    registry: MlflowRegistry | None = None,
) -> Promotion:
    """Run the gate for `version` against the current champion, both scored on this
    workspace's test split, and move `champion` if it passes, or with `force` regardless
    (recorded as forced). `registry`: an open one (default: opened here).

    Raises:
        TrackingError: the registry failed (nothing was moved).
        ContractError: this workspace has no prepared data (run `dvc repro augment`).
    """
    if registry is None:
        during = f"`genderclf promote {version}`"
        with open_registry(settings.registry.retries, during, "Nothing was moved") as reg:
            return promote(settings, paths, version, reason, force=force, by=by, registry=reg)
    quiet_tensorflow()
    from genderclf.model.scoring import expected_calibration_error
    from genderclf.promotion import gate, summary, version_scores

    data = PreparedData.read(paths.prepared)
    cand = version_scores(registry, version, data, settings.train.batch_size * 2)
    ece = expected_calibration_error(cand.y, cand.p, settings.evaluate.calibration_bins)[0]
    champ = registry.champion()
    checks = gate(settings, data, paths.splits, registry, version, cand, ece, champ)
    passed = all(c.passed for c in checks)
    if not (passed or force) or (champ is not None and champ.version == version):
        return Promotion(False, checks, None)
    label = "promoted" if passed else "forced (gate failed)"
    who = f" by {by}" if by else ""
    move = registry.promote(
        version, champ.version if champ else None, f"{label}{who}: {reason}. {summary(checks)}"
    )
    return Promotion(move is not None, checks, move)


def approve(
    settings: Settings, paths: Paths, version: str, approved: bool, reason: str, reviewer: str
) -> Promotion:
    """A person's answer to a challenger waiting for approval (`register.approval:
    manual`): recorded on the version either way; an approved one is promoted through the
    gate again, against today's champion."""
    during = f"the approval of version {version}"
    with open_registry(settings.registry.retries, during, "Nothing was moved") as registry:
        registry.record_approval(version, approved, reason, reviewer)
        if not approved:
            return Promotion(False, [], None)
        return promote(settings, paths, version, reason, by=reviewer, registry=registry)


def rollback(settings: Settings, reason: str) -> tuple[str, str]:
    """Point `champion` back at the version it replaced (the recorded alias history).

    Returns:
        (the champion before, the champion now).

    Raises:
        GenderclfError: no earlier champion is recorded, or the champion moved meanwhile.
    """
    during = "`genderclf rollback`"
    with open_registry(settings.registry.retries, during, "Nothing was moved") as registry:
        pair = registry.previous_champion()
        if pair is None:
            raise GenderclfError("no earlier champion is recorded: nothing to roll back to")
        now, before = pair
        move = registry.promote(before, now, f"rollback: {reason}")
    if move is None:
        raise GenderclfError("the champion changed while rolling back; run it again")
    return now, before


def check_drift(
    settings: Settings, location: str, paths: Paths = PATHS, reference: Path | None = None
) -> Any:
    """Check a batch against the champion and its reference; log the check to MLflow.

    The champion is resolved once and loaded by version, so the model and the reference
    belong together even if the alias moves meanwhile. `reference` (a local .npz) replaces
    the registered one. Returns the DriftReport.
    """
    quiet_tensorflow()
    from genderclf.monitor.drift import check
    from genderclf.monitor.profile import Profile
    from genderclf.tracking.monitor import champion, download_reference, log_drift
    from genderclf.tracking.serving import load_classifier

    champ = champion(settings.registry.retries)
    with tempfile.TemporaryDirectory(prefix="genderclf-ref-") as tmp:
        ref_file = reference or download_reference(champ, Path(tmp), settings.registry.retries)
        ref = Profile.load(ref_file, f"reference of version {champ.version} ({ref_file})")
    clf = load_classifier(champ.model_uri)
    report = check(location, clf, ref, settings, paths.drift, champ.describe())
    log_drift(report.result, report.files, champ)
    return report
