"""The validate stage: check every image and the label table; write the manifest and reports.

Every file the layout found ends up in exactly one of `data/validated/manifest.csv` (one
row per usable image) and `reports/validation/rejected.csv` (path, reason), together with
the files the download refused (links out of the source). The first image of each
content is kept; later copies are rejected as duplicates of it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from genderclf.config import GenderclfError, Paths, Settings
from genderclf.data.expectations import (
    failed_expectations,
    report_html,
    run_expectations,
    run_time_of,
)
from genderclf.data.layouts import stream_layout
from genderclf.data.manifest import ValidationTables
from genderclf.data.remote import open_raw
from genderclf.data.scratch import RawTree, Scratch
from genderclf.io import atomic_write, read_json, write_json

log = logging.getLogger(__name__)

SHOWN_REJECTS = 200  # rejected files listed in report.html (all of them are in rejected.csv)


class ValidationFailed(GenderclfError, RuntimeError):
    """An expectation failed or too many files were rejected; reports are still written."""


@dataclass(frozen=True)
class ValidateReport:
    summary: dict[str, Any]  # what metrics/validation.json holds


def _summary(tables: ValidationTables, gx_passed: bool) -> dict[str, Any]:
    usable, rejected = tables.usable, tables.rejects
    total = usable + rejected
    return {
        "layout": tables.layout,
        "files_seen": total,
        "usable": usable,
        "rejected": rejected,
        "reject_fraction": round(rejected / total if total else 1.0, 6),
        "reject_reasons": tables.reject_reasons(),
        "male_fraction": tables.male_fraction(),
        "converted_modes": tables.converted_modes(),
        "expectations_passed": gx_passed,
    }


def run(settings: Settings, paths: Paths, progress: bool = True) -> ValidateReport:
    """Check the raw dataset; write the manifest, `rejected.csv`, GX results and Data Docs.

    Works on the dataset in parts (a scratch SQLite database, the manifest written row by
    row), so memory stays flat however many images there are; the per-image checks run in
    local processes, or on the Ray cluster that RAY_ADDRESS names, with the same results.

    Raises:
        ValidationFailed: an expectation failed or the rejected fraction exceeds
            `validate.max_reject_fraction`; the reports are written, the manifest is not
            (an older one is removed).
        ObjectChanged: an S3 object differs from the listing in data/raw (by-reference).
    """
    cfg = settings.validation
    s3 = settings.data.s3
    source = open_raw(paths.raw, s3.endpoint_url, s3.retries)
    record = read_json(paths.source_file, "") if paths.source_file.is_file() else {}
    with Scratch(prefix="genderclf-validate-") as scratch:
        tables = ValidationTables(
            scratch, stream_layout(RawTree(scratch, paths.raw), settings.data.layout)
        )
        log.info("validate: %s layout, %d candidate images", tables.layout, tables.candidates)
        tables.check(source, cfg, progress)
        # Files the download refused (links out of the source) are rejects too.
        for r in record.get("refused", []):
            tables.reject(r["path"], r["reason"])
        tables.write_rejected(paths.rejected)
        gx_result = run_expectations(
            scratch.path, tables.manifest_table(), cfg, paths.data_docs, run_time_of(record)
        )
        write_json(paths.validation / "gx_results.json", gx_result)
        summary = _summary(tables, bool(gx_result["success"]))
        write_json(paths.validation_metrics, summary)
        shown = list(tables.rejected_rows(SHOWN_REJECTS))
        atomic_write(
            paths.validation_report,
            report_html(summary, gx_result, shown, SHOWN_REJECTS, summary["rejected"]),
        )

        problems = failed_expectations(gx_result)
        if summary["reject_fraction"] > cfg.max_reject_fraction:
            problems.append(
                f"rejected fraction {summary['reject_fraction']:.3f} exceeds "
                f"validate.max_reject_fraction={cfg.max_reject_fraction} "
                f"({summary['rejected']} of {summary['files_seen']} files; see {paths.rejected})"
            )
        if problems:
            paths.manifest.unlink(missing_ok=True)
            raise ValidationFailed(
                "validation failed:\n  - "
                + "\n  - ".join(problems)
                + f"\nReport: {paths.validation_report} (and {paths.rejected}, Data Docs in "
                f"{paths.data_docs}/)"
            )
        tables.write_manifest(paths.manifest)
    return ValidateReport(summary)
