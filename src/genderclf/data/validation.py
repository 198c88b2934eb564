"""The validate stage: image checks in parallel, a Great Expectations suite over the manifest.

Outputs (see ARCHITECTURE.md): `data/validated/manifest.csv` with one row per usable image,
and `reports/validation/` with `rejected.csv` (path, reason), the GX results JSON and the
rendered Data Docs. Every file the layout found ends up in exactly one of the two.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import multiprocessing as mp
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from genderclf.config import Settings, ValidateSettings, cpu_workers
from genderclf.data.fsutil import write_json
from genderclf.data.layouts import Candidates, read_layout

log = logging.getLogger(__name__)

EXTENSION_FORMATS = {
    ".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".gif": "GIF",
    ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF",
}  # fmt: skip
CONVERTIBLE_MODES = {"RGB", "L", "LA", "RGBA", "CMYK", "P", "PA", "I;16", "I", "F", "1", "YCbCr"}
MAX_PIXELS = 50_000_000  # refuse decompression bombs rather than exhausting memory


class ValidationFailed(RuntimeError):
    """An expectation failed or too many files were rejected; reports are still written."""


@dataclass(frozen=True)
class ImageCheck:
    path: str
    ok: bool
    reason: str = ""
    sha256: str = ""
    width: int = 0
    height: int = 0
    mode: str = ""
    format: str = ""


def _looks_like_text(data: bytes) -> bool:
    head = data[:512]
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def check_image(path: str, root: str, min_side: int, allow_format_mismatch: bool) -> ImageCheck:
    """Check one image file; never raises for a bad file, returns the reason instead."""
    from PIL import Image, ImageFile, UnidentifiedImageError

    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not be padded
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    full = Path(root) / path
    try:
        data = full.read_bytes()
    except OSError as err:
        return ImageCheck(path, False, f"unreadable: {err.strerror or err}")
    if not data:
        return ImageCheck(path, False, "zero_byte: empty file")
    digest = hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt = im.format or ""
            width, height = im.size
            if width * height > MAX_PIXELS:
                return ImageCheck(path, False, f"too_large: {width}x{height} pixels")
            im.load()
    except UnidentifiedImageError:
        if _looks_like_text(data):
            return ImageCheck(path, False, "text_file: text content behind an image extension")
        return ImageCheck(path, False, "not_an_image: unrecognised image data")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return ImageCheck(path, False, f"too_large: {err}")
    except (OSError, SyntaxError, ValueError) as err:
        msg = str(err)
        if "truncated" in msg.lower() or isinstance(err, SyntaxError) or "premature" in msg:
            return ImageCheck(path, False, f"truncated: {msg}")
        return ImageCheck(path, False, f"corrupt: {msg}")
    expected = EXTENSION_FORMATS.get(Path(path).suffix.lower())
    if expected and fmt != expected and not allow_format_mismatch:
        return ImageCheck(path, False, f"format_mismatch: {fmt} data behind a "
                          f"{Path(path).suffix} name (set validate.allow_format_mismatch)")  # fmt: skip
    if min(width, height) < min_side:
        return ImageCheck(path, False, f"too_small: {width}x{height}, "
                          f"below validate.min_side={min_side}")  # fmt: skip
    if im.mode not in CONVERTIBLE_MODES:
        return ImageCheck(path, False, f"unsupported_mode: {im.mode}")
    try:
        im.convert("RGB")  # grayscale, RGBA, CMYK and palette images are converted downstream
    except (OSError, ValueError) as err:
        return ImageCheck(path, False, f"unsupported_mode: {im.mode} ({err})")
    return ImageCheck(path, True, "", digest, width, height, im.mode, fmt)


_ARGS: dict[str, Any] = {}


def _init(args: dict[str, Any]) -> None:
    _ARGS.update(args)


def _check(path: str) -> ImageCheck:
    return check_image(path, **_ARGS)


def check_images(
    paths: list[str], root: str | os.PathLike[str], cfg: ValidateSettings, progress: bool = True
) -> list[ImageCheck]:
    """Check every image, in parallel over `validate.workers` processes, in input order."""
    from tqdm import tqdm

    args = {"root": str(root), "min_side": cfg.min_side,
            "allow_format_mismatch": cfg.allow_format_mismatch}  # fmt: skip
    workers = min(cpu_workers(cfg.workers), max(1, len(paths) // 64))
    bar = tqdm(total=len(paths), desc="validate", unit="img", disable=not progress)
    out: list[ImageCheck] = []
    if workers <= 1:
        _init(args)
        for p in paths:
            out.append(_check(p))
            bar.update()
    else:
        ctx = mp.get_context("spawn")  # spawn: safe even if TensorFlow is loaded here
        with ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_init, initargs=(args,)
        ) as ex:
            for r in ex.map(_check, paths, chunksize=128):
                out.append(r)
                bar.update()
    bar.close()
    return out


# --- Great Expectations --------------------------------------------------------------------


def run_expectations(manifest: pd.DataFrame, cfg: ValidateSettings, docs_dir: Path) -> dict:
    """Run the manifest suite with GX; render Data Docs into `docs_dir`.

    Returns:
        The GX validation result as a JSON-able dict (key `success` says if all passed).
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    import great_expectations.expectations as gxe

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = {"globally": False}
    ctx.add_data_docs_site(
        site_name="validation",
        site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": str(docs_dir.resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )  # fmt: skip
    batch = ctx.data_sources.add_pandas("manifest").add_dataframe_asset("manifest")
    batch_def = batch.add_batch_definition_whole_dataframe("all")
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
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")],
            result_format={"result_format": "SUMMARY"},
        )
    )
    # GX wants plain object columns; pandas' nullable NA in attribute columns is not needed here.
    result = checkpoint.run(
        batch_parameters={"dataframe": manifest[["path", "label", "partition", "sha256"]]}
    )
    vr = next(iter(result.run_results.values()))
    return vr.to_json_dict()


def _failed_expectations(gx_result: dict) -> list[str]:
    out = []
    for r in gx_result.get("results", []):
        if not r.get("success"):
            cfg = r["expectation_config"]
            kw = {k: v for k, v in cfg["kwargs"].items() if k != "batch_id"}
            res = r.get("result", {})
            seen = res.get("observed_value", res.get("partial_unexpected_list"))
            out.append(f"{cfg['type']}({kw}) observed {seen}")
    return out


# --- The stage -----------------------------------------------------------------------------


def validate(
    settings: Settings,
    raw_dir: Path,
    manifest_file: Path,
    report_dir: Path,
    summary_file: Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Check the raw dataset; write the manifest and the reports.

    Returns:
        A summary dict (counts, reject reasons, GX success).

    Raises:
        ValidationFailed: an expectation failed or the rejected fraction exceeds
            `validate.max_reject_fraction`; reports are written before raising and
            the manifest is not.
    """
    cfg = settings.validation
    cands: Candidates = read_layout(raw_dir, settings.data.layout)
    rows = cands.rows
    log.info("validate: %s layout, %d candidate images", cands.layout, len(rows))
    checks = check_images(rows["path"].tolist(), raw_dir, cfg, progress=progress)
    rejected = list(cands.rejected)
    keep: list[bool] = []
    first_seen: dict[str, str] = {}
    for c in checks:
        if not c.ok:
            rejected.append((c.path, c.reason))
            keep.append(False)
        elif c.sha256 in first_seen:
            rejected.append((c.path, f"duplicate: same content as {first_seen[c.sha256]}"))
            keep.append(False)
        else:
            first_seen[c.sha256] = c.path
            keep.append(True)
    info = pd.DataFrame([c.__dict__ for c in checks], columns=list(ImageCheck.__dataclass_fields__))
    manifest = rows.assign(
        sha256=info["sha256"].values, width=info["width"].values,
        height=info["height"].values, mode=info["mode"].values,
    )[keep].reset_index(drop=True)  # fmt: skip

    report_dir.mkdir(parents=True, exist_ok=True)
    rejected.sort()
    with open(report_dir / "rejected.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "reason"])
        w.writerows(rejected)
    gx_result = run_expectations(manifest, cfg, report_dir / "data_docs")
    write_json(report_dir / "gx_results.json", gx_result)

    total = len(manifest) + len(rejected)
    reject_fraction = len(rejected) / total if total else 1.0
    reasons: dict[str, int] = {}
    for _, reason in rejected:
        key = reason.split(":", 1)[0]
        reasons[key] = reasons.get(key, 0) + 1
    summary = {
        "layout": cands.layout,
        "files_seen": total,
        "usable": len(manifest),
        "rejected": len(rejected),
        "reject_fraction": round(reject_fraction, 6),
        "reject_reasons": reasons,
        "male_fraction": round(float(manifest["label"].mean()), 6) if len(manifest) else None,
        "converted_modes": {
            k: int(v) for k, v in manifest["mode"].value_counts().items() if k != "RGB"
        },
        "expectations_passed": bool(gx_result["success"]),
    }
    write_json(summary_file, summary)

    problems = _failed_expectations(gx_result)
    if reject_fraction > cfg.max_reject_fraction:
        problems.append(
            f"rejected fraction {reject_fraction:.3f} exceeds validate.max_reject_fraction="
            f"{cfg.max_reject_fraction} ({len(rejected)} of {total} files; see "
            f"{report_dir / 'rejected.csv'})"
        )
    if problems:
        if manifest_file.exists():
            manifest_file.unlink()
        raise ValidationFailed(
            "validation failed:\n  - "
            + "\n  - ".join(problems)
            + f"\nReports: {report_dir}/ (Data Docs: {report_dir / 'data_docs' / 'index.html'})"
        )
    manifest_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = manifest_file.with_name(f".{manifest_file.name}.tmp")
    manifest.to_csv(tmp, index=False)
    os.replace(tmp, manifest_file)
    return summary
