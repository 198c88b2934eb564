"""The CLI's error path: one readable message, exit 1, and what to do next."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from genderclf.cli import app


def test_a_stage_refusing_its_params_says_how_to_get_its_outputs_back(tmp_path, tiny_params):
    bad = tmp_path / "params.yaml"
    bad.write_text(
        yaml.safe_dump({**tiny_params, "augment": {**tiny_params["augment"], "copys": 2}})
    )
    result = CliRunner().invoke(app, ["augment", "--params", str(bad)])
    assert result.exit_code == 1
    assert "augment.copys: unknown key" in result.output
    # `dvc repro` removed the stage's outputs before the command refused to run
    assert "`dvc checkout augment`" in result.output and "Traceback" not in result.output


def test_a_tool_refusing_its_params_has_no_dvc_hint(tmp_path, tiny_params):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump({**tiny_params, "predict": {}}))
    photo = tmp_path / "x.jpg"
    photo.write_bytes(b"")
    result = CliRunner().invoke(app, ["predict", str(photo), "--params", str(bad)])
    assert result.exit_code == 1 and "predict.cascade: missing" in result.output
    assert "dvc checkout" not in result.output


def test_the_download_hint_says_nothing_was_lost(tmp_path, tiny_params):
    """A typo in params.yaml stops `dvc repro` at download (it runs first and keeps data/raw):
    the hint is `dvc repro` again, not a `dvc checkout` of outputs nothing removed."""
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump({**tiny_params, "train": {**tiny_params["train"], "lr_hed": 1}}))
    result = CliRunner().invoke(app, ["download", "--params", str(bad)])
    assert result.exit_code == 1 and "train.lr_hed: unknown key" in result.output
    assert "run `dvc repro` again (nothing was removed)" in result.output
    assert "dvc checkout" not in result.output and "dvc repro download" not in result.output


def test_a_typo_in_a_flow_override_is_one_message():
    """`python flows/pipeline.py -S train.lr_hed=0.002`, run as a user runs it: the message
    on stderr, exit 2, no traceback, and no flow run started (the check runs before Prefect).
    A process of its own: the flow module imports Prefect, whose logging set-up should not
    outlive this test in pytest's process."""
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "flows/pipeline.py", "-S", "train.lr_hed=0.002"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and "train.lr_hed: unknown key" in done.stderr
    assert "Traceback" not in done.stderr and "Flow run" not in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 3  # the message and its one setting
