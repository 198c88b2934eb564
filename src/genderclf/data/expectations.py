"""The Great Expectations suite over the validated manifest, with its Data Docs.

GX reads the manifest through SQL (a table of the validate stage's scratch SQLite
database), so the database does the counting and GX's memory stays flat however many
images there are. The run has a fixed identity (its time is the data's download time),
the ids GX draws at random are left out of `gx_results.json`, and the Data Docs pages are
settled after GX writes them (its render and load times become the run's time, its random
element ids count up): the same data gives the same report files, on any engine and however
often validation runs, so DVC records the same hash for them.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from genderclf.config import ValidateSettings

RUN_NAME = "validate"
_GX_TIME = re.compile(rb"\d{8}T\d{6}\.\d{6}Z")
_CACHE_BUSTER = re.compile(rb"\?d=\d{8}T\d{6}\.\d{6}Z")
_UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def run_time_of(record: dict[str, Any] | None) -> datetime:
    """The run time GX records: when the data was downloaded (SOURCE.json), else 1970-01-01."""
    text = (record or {}).get("downloaded_at")
    try:
        when = datetime.fromisoformat(str(text))
    except ValueError:
        return datetime(1970, 1, 1, tzinfo=UTC)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _stable(result: dict[str, Any]) -> dict[str, Any]:
    """The GX result without what changes on every run: random ids and the load time."""
    meta = result.get("meta", {})
    for key in ("checkpoint_id", "validation_id"):
        meta.pop(key, None)
    meta.get("batch_markers", {}).pop("ge_load_time", None)
    for r in result.get("results", []):
        r.get("expectation_config", {}).pop("id", None)
    return result


def settle_docs(docs_dir: Path, run_time: datetime) -> None:
    """Make GX's Data Docs pages the same bytes for the same results.

    GX writes the time it rendered each page (a `?d=` on the logo's URL) and the time it
    loaded the batch, and draws a random id for each collapsible element. Here every such
    time becomes the run's time and the ids count up in their order on the page (an id used
    twice on a page stays one id).
    """
    stamp = run_time.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%fZ").encode()
    for page in sorted(Path(docs_dir).rglob("*.html")):
        text = _GX_TIME.sub(stamp, _CACHE_BUSTER.sub(b"", page.read_bytes()))
        ids: dict[bytes, bytes] = {}

        def number(m: re.Match[bytes], ids: dict[bytes, bytes] = ids) -> bytes:
            return ids.setdefault(m.group(0), b"00000000-0000-4000-8000-%012d" % (len(ids) + 1))

        page.write_bytes(_UUID.sub(number, text))


def run_expectations(
    database: Path, table: str, cfg: ValidateSettings, docs_dir: Path, run_time: datetime
) -> dict:
    """Run the manifest suite with GX on `table` of the SQLite file `database`; render Data
    Docs into `docs_dir`.

    Returns:
        The GX validation result as a JSON-able dict (key `success` says if all passed).
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.core.run_identifier import RunIdentifier

    # GX sets this module's logger to INFO on import (over the CLI's WARNING for the
    # package), and it says only where a temporary folder went.
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = {"globally": False}
    # An ephemeral context comes with a docs site in a fresh temporary folder, which every
    # checkpoint run would build (4 MB) and nobody removes: only our site is kept.
    for site_name in list(ctx.list_data_docs_sites()):
        ctx.delete_data_docs_site(site_name)
    ctx.add_data_docs_site(
        site_name="validation",
        site_config={
            "class_name": "SiteBuilder",
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(docs_dir.resolve()),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    source = ctx.data_sources.add_sqlite(
        "manifest", connection_string=f"sqlite:///{Path(database).resolve()}"
    )
    batch_def = source.add_table_asset(
        "manifest", table_name=table
    ).add_batch_definition_whole_table("all")
    suite = ctx.suites.add(gx.ExpectationSuite(name="manifest"))
    for col in ("path", "label", "partition"):
        suite.add_expectation(gxe.ExpectColumnToExist(column=col))
    for col in ("path", "label"):
        suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=col))
    suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="label", value_set=[0, 1]))
    suite.add_expectation(
        gxe.ExpectColumnValuesToBeInSet(column="partition", value_set=["train", "val", "test", ""])
    )
    suite.add_expectation(gxe.ExpectColumnValuesToBeUnique(column="path"))
    suite.add_expectation(gxe.ExpectColumnValuesToBeUnique(column="sha256"))
    suite.add_expectation(gxe.ExpectTableRowCountToBeBetween(min_value=cfg.min_rows))
    suite.add_expectation(
        gxe.ExpectColumnMeanToBeBetween(
            column="label", min_value=cfg.male_fraction_min, max_value=cfg.male_fraction_max
        )
    )
    vd = ctx.validation_definitions.add(
        gx.ValidationDefinition(data=batch_def, suite=suite, name="manifest")
    )
    checkpoint = ctx.checkpoints.add(
        gx.Checkpoint(
            name="validate",
            validation_definitions=[vd],
            actions=[
                gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["validation"])
            ],
            result_format={"result_format": "SUMMARY"},
        )
    )
    result = checkpoint.run(run_id=RunIdentifier(run_name=RUN_NAME, run_time=run_time))
    settle_docs(docs_dir, run_time)
    vr = next(iter(result.run_results.values()))
    # Pages settled first (times, ids), then made to read offline (tables written out).
    offline_data_docs(docs_dir)
    # A JSON round trip: plain types only, as they are written to gx_results.json.
    return _stable(json.loads(json.dumps(vr.to_json_dict(), default=str)))


# GX's Data Docs pages load Bootstrap, jQuery, bootstrap-table, Font Awesome and Vega from
# CDNs, and the index fills its tables with bootstrap-table from data in a script: offline
# it lists nothing. `offline_data_docs` drops the remote tags and writes those tables out.
_REMOTE_TAG = re.compile(
    r"""<script[^>]*\bsrc=["']https?://[^"']*["'][^>]*>\s*</script>\s*"""
    r"""|<link[^>]*\bhref=["']https?://[^"']*\.css[^"']*["'][^>]*>\s*"""
    r"""|<img[^>]*\bsrc=["']https?://[^"']*["'][^>]*>""",
    re.I,
)
# A CSS background from GX's web assets (its logo), in the pages and their stylesheet.
_REMOTE_URL = re.compile(r"""url\(\s*['"]?https?://[^)'"]*['"]?\s*\)""", re.I)
# One index table: its element, its toolbar, and the script that fills it (columns, data).
_JS_TABLE = re.compile(
    r'<div id="(?P<id>[\w-]+)-toolbar"[^>]*>.*?</div>\s*'
    r'<table\s+id="(?P=id)"(?P<attrs>[^>]*)>\s*</table>\s*'
    r"<script>.*?</script>\s*<script>(?P<fill>.*?)</script>",
    re.S,
)
# Inline scripts that need those libraries (jQuery's `$`, Vega): they would only fail.
_LIB_SCRIPT = re.compile(
    r"<script>(?:(?!</script>).)*?(?:\$\(|vegaEmbed)(?:(?!</script>).)*</script>\s*", re.S
)
# Font Awesome's status icons are empty without its stylesheet: words instead.
_ICONS = {"fa-check-circle": "passed", "fa-times-circle": "FAILED", "fa-times": "FAILED"}
_ICON = re.compile(
    r'<i class="[^"]*\b(fa-check-circle|fa-times-circle|fa-times)\b[^"]*"[^>]*>\s*</i>'
)
_OFFLINE_CSS = """<style>
  /* genderclf: no CDN stylesheets here (the page reads offline); a plain table layout. */
  body { font-family: sans-serif; margin: 1em 2em; }
  .tab-content > .tab-pane { display: block !important; opacity: 1 !important; }
  table.ge-offline { border-collapse: collapse; margin: 0.5em 0 1.5em; }
  table.ge-offline th, table.ge-offline td { border: 1px solid #ccc; padding: 4px 10px;
    text-align: left; }
</style>
"""


def _text(cell: object) -> str:
    from html import unescape

    return " ".join(unescape(re.sub(r"<[^>]+>", " ", str(cell))).split())


def _static_table(match: re.Match) -> str:
    from html import escape

    fill = match.group("fill")
    try:
        columns = ast.literal_eval(re.search(r"columns: (\[.*?\]),\n", fill).group(1))
        data = ast.literal_eval(re.search(r"data: (\[.*?\]),\n", fill, re.S).group(1))
    except (AttributeError, ValueError, SyntaxError):
        return match.group(0)  # not the layout this was written for: leave GX's page alone
    head = "".join(f"<th>{escape(c['title'])}</th>" for c in columns)
    rows = []
    for row in data:
        cells = []
        for c in columns:
            f = c["field"]
            shown = row.get(f, "")
            if f"_{f}_text" in row:  # the status: an icon in GX's cell, a word here
                shown = row[f"_{f}_text"]
            elif "<" in str(shown) and f"_{f}_sort" in row:  # a tooltip or link: its text
                shown = row[f"_{f}_sort"]
            text = escape(_text(shown))
            link = re.search(r'href="([^"#][^"]*)"', str(row.get(f, "")))
            if link:
                text = f'<a href="{escape(link.group(1))}">{text}</a>'
            elif f == columns[0]["field"] and row.get("_table_row_link_path"):
                text = f'<a href="{escape(row["_table_row_link_path"])}">{text}</a>'
            cells.append(f"<td>{text}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    body = "".join(rows) or f'<tr><td colspan="{len(columns)}">none</td></tr>'
    return (
        f'<table id="{match.group("id")}" class="ge-offline table-sm">'
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>\n"
    )


def offline_data_docs(docs_dir: Path) -> None:
    """Make the Data Docs read offline: no remote scripts, stylesheets or images, and the
    index's tables written out as HTML (the validation results with their status, time
    and a link to each result page; the expectation suites)."""
    for sheet in sorted(docs_dir.rglob("*.css")):
        css = sheet.read_text(encoding="utf-8")
        if _REMOTE_URL.search(css):
            sheet.write_text(_REMOTE_URL.sub("none", css), encoding="utf-8")
    for page in sorted(docs_dir.rglob("*.html")):
        html = _REMOTE_URL.sub("none", page.read_text(encoding="utf-8"))
        out = _LIB_SCRIPT.sub("", _JS_TABLE.sub(_static_table, _REMOTE_TAG.sub("", html)))
        out = _ICON.sub(lambda m: _ICONS[m.group(1)], out)
        if _OFFLINE_CSS not in out:  # GX rewrites only the pages of a new result
            out = out.replace("</head>", _OFFLINE_CSS + "</head>", 1)
        page.write_text(out, encoding="utf-8")


def failed_expectations(gx_result: dict) -> list[str]:
    out = []
    for r in gx_result.get("results", []):
        if not r.get("success"):
            cfg = r["expectation_config"]
            kw = {k: v for k, v in cfg["kwargs"].items() if k != "batch_id"}
            res = r.get("result", {})
            seen = res.get("observed_value", res.get("partial_unexpected_list"))
            out.append(f"{cfg['type']}({kw}) observed {seen}")
    return out


def report_html(
    summary: dict,
    gx_result: dict,
    rejected: list[tuple[str, str]],
    shown: int = 200,
    total: int | None = None,
) -> str:
    """A self-contained validation report (inline CSS, no scripts, no network).

    GX's Data Docs load their CSS and JavaScript from CDNs, so offline they render
    unstyled and their index lists nothing; this page reads the same everywhere.

    Args:
        rejected: the rejected files (the first `shown` are listed).
        total: how many were rejected in all, when `rejected` holds only the first ones.
    """
    total = len(rejected) if total is None else total
    from html import escape

    def row(*cells: object, cls: str = "") -> str:
        tds = "".join(f"<td>{escape(str(c))}</td>" for c in cells)
        return f'<tr class="{cls}">{tds}</tr>'

    checks = []
    for r in gx_result.get("results", []):
        cfg = r["expectation_config"]
        kw = {k: v for k, v in cfg["kwargs"].items() if k != "batch_id"}
        res = r.get("result", {})
        seen = res.get("observed_value", res.get("unexpected_count", ""))
        ok = bool(r.get("success"))
        checks.append(
            row(
                "pass" if ok else "FAIL",
                cfg["type"],
                json.dumps(kw),
                seen,
                cls="ok" if ok else "bad",
            )
        )
    reasons = [row(k, v) for k, v in sorted(summary.get("reject_reasons", {}).items())]
    files = [row(p, why) for p, why in rejected[:shown]]
    more = f"<p>... and {total - shown} more in rejected.csv</p>" if total > shown else ""
    verdict = "passed" if summary.get("expectations_passed") else "FAILED"
    facts = [
        row(k, summary.get(k))
        for k in ("layout", "files_seen", "usable", "rejected", "reject_fraction", "male_fraction")
    ]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Validation report</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; color: #222 }}
h1 {{ font-size: 1.5rem }} h2 {{ font-size: 1.15rem; margin-top: 2rem }}
table {{ border-collapse: collapse; width: 100% }}
td, th {{ border-bottom: 1px solid #ddd; padding: .3rem .6rem; text-align: left;
          vertical-align: top; word-break: break-all }}
th {{ background: #f4f4f4 }} tr.ok td:first-child {{ color: #1a7f37; font-weight: 600 }}
tr.bad td {{ background: #fdecea }} tr.bad td:first-child {{ color: #b42318; font-weight: 700 }}
.verdict {{ font-weight: 700; color: {"#1a7f37" if verdict == "passed" else "#b42318"} }}
</style></head><body>
<h1>Validation report: expectations <span class="verdict">{verdict}</span></h1>
<table>{"".join(facts)}</table>
<h2>Expectations (Great Expectations suite over the manifest)</h2>
<table><tr><th>result</th><th>expectation</th><th>arguments</th><th>observed</th></tr>
{"".join(checks)}</table>
<h2>Rejected files by reason</h2>
<table><tr><th>reason</th><th>files</th></tr>{"".join(reasons) or row("none", 0)}</table>
<h2>Rejected files</h2>
<table><tr><th>path</th><th>reason</th></tr>{"".join(files) or row("none", "")}</table>{more}
</body></html>
"""
