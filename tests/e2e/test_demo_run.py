"""What a user sees after the demo: the flow's output, the MLflow run page, the Prefect
flow-run page.

One tiny pipeline run through `python flows/pipeline.py` (what `make demo` runs, with
Prefect's ephemeral API) in a copy of the pipeline. Its whole output is checked for noise;
then a real Prefect server (on the same Prefect database) and the MLflow UI are started on
loopback and opened in headless Chromium (Debian's `chromium`, driven by Playwright), and
the pages must show the logged model, the metric sections, the plots and the artifacts.
Screenshots are kept in the test's tmp folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.helpers import BIN
from tests.helpers.params import pipeline_params
from tests.helpers.servers import MLFLOW_SERVER_ENV, free_port, http_json, wait_http
from tests.helpers.workspace import copy_pipeline, git_init, pipeline_env, write_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """A tiny `python flows/pipeline.py` run; its output, workspace and Prefect home."""
    root = tmp_path_factory.mktemp("demo")
    repo = copy_pipeline(root / "repo", ("src", "flows"))
    write_params(repo, pipeline_params())
    git_init(repo)
    env = pipeline_env(
        repo,
        drop=("MLFLOW_", "PREFECT_"),
        PREFECT_HOME=str(root / "prefect"),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
    )
    proc = subprocess.run(
        [sys.executable, "flows/pipeline.py"],
        cwd=repo,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-6000:]
    result = json.loads(proc.stdout[proc.stdout.index("{\n") : proc.stdout.rindex("}") + 1])
    return {"root": root, "repo": repo, "env": env, "output": proc.stdout, "result": result}


# --- the terminal ------------------------------------------------------------------------------

NOISE = {
    "a traceback": re.compile(r"Traceback \(most recent call last\)"),
    "a TensorFlow C++ log line": re.compile(r"\b[IEW]0000 "),
    "the oneDNN notice": re.compile(r"oneDNN custom operations"),
    "the CUDA driver notice": re.compile(r"cuda drivers|cuInit"),
    "a raw terminal escape": re.compile(r"\x1b\[|\[1;33m"),
    "a progress-bar frame": re.compile(r"\d+%\|[^|]*\||it/s\]|━━━"),
    "absl's pre-init notice": re.compile(r"absl::InitializeLog"),
    "a CloudPickle warning": re.compile(r"[Cc]loud[Pp]ickle"),
    "a stray `color_warning(`": re.compile(r"color_warning\("),
}


def test_the_demo_output_is_readable(demo):
    out = demo["output"]
    found = {what: m.group(0) for what, rx in NOISE.items() if (m := rx.search(out))}
    assert found == {}, f"noise in the flow's output: {found}"
    assert out.count("Use `dvc push`") == 1
    # Prefect lines are `time | LEVEL | logger - message`: a warning is logged as one
    for line in out.splitlines():
        parts = line.split(" | ")
        if len(parts) >= 3 and re.search(r"\bWARNING\b|Warning:", parts[2]):
            assert parts[1].strip() == "WARNING", line
    assert [demo["result"][s] for s in ("download", "train", "register")] == ["ran"] * 3


def test_an_up_to_date_rerun_makes_no_mlflow_run(demo):
    from mlflow import MlflowClient

    uri = f"sqlite:///{demo['repo'] / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("gender-classification")
    before = len(client.search_runs([exp.experiment_id]))
    proc = subprocess.run(
        [sys.executable, "flows/pipeline.py"],
        cwd=demo["repo"],
        env=demo["env"],
        text=True,
        capture_output=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "mlflow_run_id" not in proc.stdout and '"train": "skipped"' in proc.stdout
    assert len(client.search_runs([exp.experiment_id])) == before


# --- the pages -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers(demo):
    """The Prefect server on the demo's Prefect database, and the MLflow UI on its store."""
    if not Path(CHROMIUM).exists():
        pytest.fail("headless Chromium is needed: apt-get install chromium (.ci/run does)")
    prefect_port, mlflow_port = free_port(), free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    logs = demo["root"] / "logs"
    logs.mkdir()
    env = {
        **demo["env"],
        "PREFECT_API_URL": api,
        "PREFECT_UI_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        **MLFLOW_SERVER_ENV,
    }
    procs = []
    for name, cmd in (
        (
            "prefect",
            [
                str(BIN / "prefect"),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(prefect_port),
            ],
        ),
        (
            "mlflow",
            [
                str(BIN / "mlflow"),
                "ui",
                "--backend-store-uri",
                f"sqlite:///{demo['repo'] / 'mlflow.db'}",
                "--host",
                "127.0.0.1",
                "--port",
                str(mlflow_port),
                "--workers",
                "1",
            ],
        ),
    ):
        with open(logs / f"{name}.log", "w") as log:
            procs.append(
                subprocess.Popen(
                    cmd,
                    cwd=demo["repo"],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    try:
        wait_http(f"{api}/health", 180, procs[0], logs / "prefect.log")
        wait_http(f"http://127.0.0.1:{mlflow_port}/health", 180, procs[1], logs / "mlflow.log")
        yield {
            "prefect": f"http://127.0.0.1:{prefect_port}",
            "api": api,
            "mlflow": f"http://127.0.0.1:{mlflow_port}",
        }
    finally:
        for p in procs:
            os.killpg(p.pid, 15)
            p.wait(30)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def _page(browser, url: str, shot: Path, click: str | None = None, settle: str | None = None):
    """Open `url` (optionally click a tab), wait until `settle` shows, screenshot; the text."""
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    page.goto(url)
    if click:
        page.get_by_text(click, exact=True).first.click(timeout=60_000)
    page.get_by_text(settle or click or "", exact=False).first.wait_for(timeout=60_000)
    time.sleep(2)  # charts and lists fill in after their first text
    page.screenshot(path=str(shot), full_page=True)
    text = page.inner_text("body")
    page.close()
    return text


def test_the_mlflow_run_page_shows_model_metrics_plots(demo, servers, browser):
    run_id = demo["result"]["mlflow_run_id"]
    run = f"{servers['mlflow']}/#/experiments/1/runs/{run_id}"
    shots = demo["root"]
    overview = _page(browser, run, shots / "mlflow-run.png", settle="Logged models")
    assert "Logged models (2)" in overview  # the Keras model and the served pyfunc model
    assert "keras_model" in overview and "gender-classifier" in overview
    assert "train (" in overview and "Training" in overview  # the datasets
    assert "Created by" in overview and "pipeline.py" in overview  # the source
    assert "prefect.flow_run_id" in overview
    charts = _page(browser, f"{run}/model-metrics", shots / "mlflow-metrics.png", settle="slice")
    for section in ("train", "val", "test", "slice"):
        assert re.search(rf"^{section}\n\(\d+\)", charts, re.M), section
    artifacts = _page(browser, f"{run}/artifacts", shots / "mlflow-artifacts.png", settle="plots")
    assert "plots" in artifacts and "registry" in artifacts and "metrics" in artifacts
    version = _page(
        browser,
        f"{servers['mlflow']}/#/models/gender-classifier/versions/1",
        shots / "mlflow-version.png",
        settle="Promoted to champion",
    )
    assert "champion" in version and "challenger" in version


def test_the_experiment_opens_in_the_model_training_view(demo, servers, browser):
    """The experiment is tagged for model development, and the links users are given (the
    flow's `mlflow-run` artifact, `make demo`, `make ui`) open MLflow's model-training view
    (its runs table), not the GenAI view (traces, "Detect issues") that MLflow 3's UI
    shows by default: in 3.17 its view switch, not the tag, decides, so the links say it."""
    from mlflow import MlflowClient

    from genderclf.tracking.setup import UI_VIEW

    client = MlflowClient(tracking_uri=f"sqlite:///{demo['repo'] / 'mlflow.db'}")
    exp = client.get_experiment_by_name("gender-classification")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert demo["result"]["mlflow_run_url"].endswith(f"?{UI_VIEW}")
    url = f"{servers['mlflow']}/#/experiments/{exp.experiment_id}?{UI_VIEW}"
    page = _page(browser, url, demo["root"] / "mlflow-experiment.png", settle="Run Name")
    assert "Model registry" in page and "detect issues" not in page.lower(), page[:2000]
    run = demo["result"]["mlflow_run_url"].replace("http://127.0.0.1:5000", servers["mlflow"])
    page = _page(browser, run, demo["root"] / "mlflow-run-link.png", settle="Logged models")
    assert "Model registry" in page and "Sessions" not in page, page[:2000]


def test_the_registry_lists_versions_as_text(demo, servers, browser):
    """The registered model's version list: each version's description as text, not
    markdown source (`**Promoted to champion.**`)."""
    url = f"{servers['mlflow']}/#/models/gender-classifier"
    page = _page(browser, url, demo["root"] / "mlflow-model.png", settle="Version 1")
    assert "champion" in page and "Promoted to champion" in page
    assert "**" not in page, [line for line in page.splitlines() if "**" in line]


def test_the_data_docs_list_the_validation_result_offline(demo, browser):
    """GX's Data Docs index and the validation report, opened from disk with the network
    blocked: the index lists the validation result and its page opens."""
    reports = demo["repo"] / "reports" / "validation"
    ctx = browser.new_context(offline=True, viewport={"width": 1300, "height": 900})
    asked: list[str] = []
    ctx.route("http*://**", lambda route: (asked.append(route.request.url), route.abort()))
    try:
        page = ctx.new_page()
        page.goto((reports / "data_docs" / "index.html").as_uri())
        page.get_by_text("Success", exact=True).first.wait_for(timeout=30_000)
        page.screenshot(path=str(demo["root"] / "data-docs.png"), full_page=True)
        index = page.inner_text("body")
        assert "Validation Results" in index and "manifest" in index
        page.get_by_text("Success", exact=True).first.click()
        page.get_by_text("Expectation Validation Result").first.wait_for(timeout=30_000)
        result = page.inner_text("body")
        assert "Succeeded" in result and "passed" in result
        page.goto((reports / "report.html").as_uri())
        assert "expectations" in page.inner_text("body")
        page.screenshot(path=str(demo["root"] / "validation-report.png"), full_page=True)
    finally:
        ctx.close()
    assert asked == []  # nothing on those pages asks the network for anything


def test_the_prefect_flow_run_page_shows_tasks_and_artifacts(demo, servers, browser):
    from mlflow import MlflowClient

    mlflow_run = MlflowClient(tracking_uri=f"sqlite:///{demo['repo'] / 'mlflow.db'}").get_run(
        demo["result"]["mlflow_run_id"]
    )
    flow_run = http_json(
        f"{servers['api']}/flow_runs/{mlflow_run.data.tags['prefect.flow_run_id']}"
    )
    assert flow_run["state_type"] == "COMPLETED"
    url = f"{servers['prefect']}/runs/flow-run/{flow_run['id']}"
    page = _page(browser, url, demo["root"] / "prefect-run.png", settle="Task Runs")
    # The page's log view renders the lines in sight: the first tasks (the last ones are
    # below it since the tune stage added its lines); every stage's task run, by the API.
    for task in ("mlflow-run", "download", "train"):
        assert task in page, task
    tasks = http_json(
        f"{servers['api']}/task_runs/filter",
        {"task_runs": {"flow_run_id": {"any_": [flow_run["id"]]}}},
    )
    names = sorted(t["name"] for t in tasks)
    for stage in ("download", "validate", "split", "augment", "tune", "train", "register"):
        assert any(n == stage or n.startswith(f"{stage}-") for n in names), (stage, names)
    arts = _page(
        browser,
        url,
        demo["root"] / "prefect-artifacts.png",
        click="Artifacts",
        settle="promotion-decision",
    )
    for key in (
        "mlflow-run",
        "validation-summary",
        "evaluation-metrics",
        "promotion-decision",
        "registered-version",
    ):
        assert key in arts, key
    # every artifact hangs off the task run that made it, none off the flow run
    found = http_json(
        f"{servers['api']}/artifacts/filter",
        {"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}, "key": {"exists_": True}}},
    )
    assert found and all(a["task_run_id"] for a in found), found
    link = next(a for a in found if a["key"] == "mlflow-run")
    assert link["data"] == (
        f"[MLflow run {demo['result']['mlflow_run_id']}]({demo['result']['mlflow_run_url']})"
    )


# --- the README's experiment commands ---------------------------------------------------------


def test_the_readme_experiment_commands_after_the_demo(demo):
    """The README's commit step leaves nothing the run wrote untracked, and its
    `dvc exp show` command, in 120 columns, shows the param the experiment changed.
    (The experiment is queued, not run: DVC's writer sets the param as `exp run` does,
    and the table has the row an experiment adds.)"""
    from tests.helpers.readme import as_argv, readme_command

    repo, env = demo["repo"], {**demo["env"], "COLUMNS": "120"}
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@e", GIT_COMMITTER_NAME="t")
    env["GIT_COMMITTER_EMAIL"] = "t@e"

    def sh(argv: list[str]) -> str:
        proc = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{argv}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    for part in readme_command("git add ").split("&&"):
        sh(as_argv(part.strip()))
    left = sh(["git", "status", "--porcelain", "--untracked-files=all"]).splitlines()
    outputs = ("plots/", "metrics/", "params/", "dvc.lock")  # params/: the tune stage's
    assert [line for line in left if line[3:].startswith(outputs)] == []
    run = readme_command("uv run dvc exp run -S ")
    key, value = run.split("-S ", 1)[1].split("=", 1)
    sh([*as_argv(run), "--queue"])
    try:
        table = sh(as_argv(readme_command("uv run dvc exp show ")))
    finally:
        sh([str(BIN / "dvc"), "queue", "remove", "--all"])
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 120, table
    assert "…" not in table, table
    header = next(line for line in lines if "Experiment" in line)
    assert key.split(".")[-1] in header, table
    assert any(value in line for line in lines), table
