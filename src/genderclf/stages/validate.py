"""The validate stage: check every image and the label table; write the manifest and reports.

Every file the layout found ends up in exactly one of `data/validated/manifest.csv` (one
row per usable image) and `reports/validation/rejected.csv` (path, reason), together with
the files the download refused (links out of the source).
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from typing import Any

import pandas as pd

from genderclf.config import GenderclfError, Paths, Settings
from genderclf.data.expectations import failed_expectations, report_html, run_expectations
from genderclf.data.layouts import read_layout
from genderclf.data.validation import ImageCheck, check_images
from genderclf.io import atomic_file, atomic_write, read_json, write_json

log = logging.getLogger(__name__)


class ValidationFailed(GenderclfError, RuntimeError):
    """An expectation failed or too many files were rejected; reports are still written."""


@dataclass(frozen=True)
class ValidateReport:
    summary: dict[str, Any]  # what metrics/validation.json holds


def _dedupe(checks: list[ImageCheck]) -> tuple[list[bool], list[tuple[str, str]]]:
    """Which checks to keep (usable, first of its content) and the reasons for the rest."""
    keep: list[bool] = []
    rejected: list[tuple[str, str]] = []
    first_seen: dict[str, str] = {}
    for c in checks:
        if not c.ok:
            rejected.append((c.path, c.reason))
        elif c.sha256 in first_seen:
            rejected.append((c.path, f"duplicate: same content as {first_seen[c.sha256]}"))
        else:
            first_seen[c.sha256] = c.path
        keep.append(c.ok and first_seen.get(c.sha256) == c.path)
    return keep, rejected


def _summary(
    layout: str, manifest: pd.DataFrame, rejected: list[tuple[str, str]], gx_passed: bool
) -> dict[str, Any]:
    total = len(manifest) + len(rejected)
    reasons: dict[str, int] = {}
    for _, reason in rejected:
        key = reason.split(":", 1)[0]
        reasons[key] = reasons.get(key, 0) + 1
    return {
        "layout": layout,
        "files_seen": total,
        "usable": len(manifest),
        "rejected": len(rejected),
        "reject_fraction": round(len(rejected) / total if total else 1.0, 6),
        "reject_reasons": reasons,
        "male_fraction": round(float(manifest["label"].mean()), 6) if len(manifest) else None,
        "converted_modes": {
            k: int(v) for k, v in manifest["mode"].value_counts().items() if k != "RGB"
        },
        "expectations_passed": gx_passed,
    }


def run(settings: Settings, paths: Paths, progress: bool = True) -> ValidateReport:
    """Check the raw dataset; write the manifest, `rejected.csv`, GX results and Data Docs.

    Raises:
        ValidationFailed: an expectation failed or the rejected fraction exceeds
            `validate.max_reject_fraction`; the reports are written, the manifest is not
            (an older one is removed).
    """
    cfg = settings.validation
    cands = read_layout(paths.raw, settings.data.layout)
    log.info("validate: %s layout, %d candidate images", cands.layout, len(cands.rows))
    checks = check_images(cands.rows["path"].tolist(), paths.raw, cfg, progress=progress)
    keep, bad = _dedupe(checks)
    # Files the download refused (links out of the source) are rejects too.
    source = read_json(paths.source_file, "") if paths.source_file.is_file() else {}
    refused = [(r["path"], r["reason"]) for r in source.get("refused", [])]
    rejected = sorted([*cands.rejected, *refused, *bad])
    info = pd.DataFrame([c.__dict__ for c in checks], columns=list(ImageCheck.__dataclass_fields__))
    manifest = cands.rows.assign(
        sha256=info["sha256"].values,
        width=info["width"].values,
        height=info["height"].values,
        mode=info["mode"].values,
    )[keep].reset_index(drop=True)

    table = io.StringIO()
    csv.writer(table, lineterminator="\n").writerows([("path", "reason"), *rejected])
    atomic_write(paths.rejected, table.getvalue())
    gx_result = run_expectations(manifest, cfg, paths.data_docs)
    write_json(paths.validation / "gx_results.json", gx_result)
    summary = _summary(cands.layout, manifest, rejected, bool(gx_result["success"]))
    write_json(paths.validation_metrics, summary)
    atomic_write(paths.validation_report, report_html(summary, gx_result, rejected))

    problems = failed_expectations(gx_result)
    if summary["reject_fraction"] > cfg.max_reject_fraction:
        problems.append(
            f"rejected fraction {summary['reject_fraction']:.3f} exceeds "
            f"validate.max_reject_fraction={cfg.max_reject_fraction} ({len(rejected)} of "
            f"{summary['files_seen']} files; see {paths.rejected})"
        )
    if problems:
        paths.manifest.unlink(missing_ok=True)
        raise ValidationFailed(
            "validation failed:\n  - "
            + "\n  - ".join(problems)
            + f"\nReport: {paths.validation_report} (and {paths.rejected}, Data Docs in "
            f"{paths.data_docs}/)"
        )
    with atomic_file(paths.manifest) as tmp:
        manifest.to_csv(tmp, index=False)
    return ValidateReport(summary)
