"""The Great Expectations suite over the validated manifest, with its Data Docs."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from genderclf.config import ValidateSettings


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
