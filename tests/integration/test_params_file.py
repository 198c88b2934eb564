"""params.yaml is in the form DVC writes back, so an experiment's diff is its one line.

`dvc exp run -S key=value` loads params.yaml with ruamel.yaml (round trip) and dumps it
again: `null` comes back empty, flow lists `[a, b]` as block lists, and the comments after
them move. Written that way already, the file comes back byte for byte but the value set.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml
from tests.helpers import REPO_ROOT
from tests.helpers.workspace import copy_pipeline, dvc, git_init

pytestmark = pytest.mark.integration


def test_dvc_exp_run_set_param_changes_one_line(tmp_path):
    repo = copy_pipeline(tmp_path / "repo", ())
    shutil.copy2(REPO_ROOT / "params.yaml", repo / "params.yaml")
    git_init(repo)
    # --queue: DVC's own writer sets the value and commits the result to its queue's stash
    # (what `dvc exp run -S` writes into the workspace), without running the pipeline.
    dvc(repo, "exp", "run", "--queue", "-S", "train.lr_head=0.003")
    numstat = subprocess.run(
        ["git", "diff", "--numstat", "HEAD", "refs/exps/celery/stash", "--", "params.yaml"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert numstat == ["1", "1", "params.yaml"]
    changed = subprocess.run(
        ["git", "show", "refs/exps/celery/stash:params.yaml"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert yaml.safe_load(changed)["train"]["lr_head"] == 0.003


def test_the_flows_override_writer_changes_one_line(tmp_path):
    from flows.pipeline import apply_overrides

    params = tmp_path / "params.yaml"
    shutil.copy2(REPO_ROOT / "params.yaml", params)
    before = params.read_text().splitlines()
    apply_overrides(params, {"train.lr_head": 0.003})
    after = params.read_text().splitlines()
    assert len(after) == len(before)
    assert [(a, b) for a, b in zip(before, after, strict=True) if a != b] == [
        ("  lr_head: 0.001", "  lr_head: 0.003")
    ]
