"""dvc.yaml's deps cover every project file each stage's command imports.

A stage whose code changed must not look up to date. For each stage this derives the
project modules its `cmd` brings in two ways, both from the real imports (no hand list):

* by running it: every stage command runs once, in order, on a tiny sample in a copy of
  the pipeline, with a `sitecustomize` that records the file of every module each process
  (and its worker processes) imported;
* by reading it: the import statements of the stage's command in `genderclf.pipeline`
  and, transitively, of every project module they reach (this also sees branches the
  tiny run did not take).

Each file found must be in the stage's deps, itself or through a folder above it. The
stage-command module and config.py count like any other. And the other way round: no
stage depends on the tools (`genderclf.tools`, `genderclf.services`, `genderclf.cli`), and
editing a tool's help text leaves `dvc status` of a pipeline that ran clean.
"""

from __future__ import annotations

import ast
import shlex
from pathlib import Path

import pytest
import yaml
from tests.helpers import REPO_ROOT
from tests.helpers.params import pipeline_params
from tests.helpers.workspace import (
    copy_pipeline,
    dvc,
    git_init,
    nothing_stale,
    pipeline_env,
    run,
    status_stages,
    write_params,
)

PACKAGE = REPO_ROOT / "src" / "genderclf"
TRACE_SITE = REPO_ROOT / "tests" / "helpers" / "trace"
STAGES = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def _deps(stage: str) -> list[str]:
    return [d for d in STAGES[stage].get("deps", []) if d.startswith(("src/", "flows/"))]


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


# --- reading the imports ---------------------------------------------------------------------


def _module_file(name: str) -> Path | None:
    """The file of a `genderclf...` module name (a package's __init__.py), if it exists."""
    parts = name.split(".")
    if parts[0] != "genderclf":
        return None
    base = PACKAGE.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(nodes: list[ast.AST]) -> set[str]:
    """`genderclf...` module names imported anywhere inside `nodes` (a from-import of a name
    that is itself a module counts as that module)."""
    out: set[str] = set()
    for node in (n for top in nodes for n in ast.walk(top)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in out if n.split(".")[0] == "genderclf" and _module_file(n)}


def _loaded_by_path(name: str, tree: ast.AST) -> set[str]:
    """Sibling modules a module names by file, `Path(__file__).with_name("x.py")`: MLflow
    runs such a file itself ("models from code": tracking/serving.py -> pyfunc_model.py)."""
    package = name.rsplit(".", 1)[0]
    return {
        f"{package}.{node.args[0].value[:-3]}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "with_name"
        and len(node.args) == 1
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
        and node.args[0].value.endswith(".py")
    }


def _closure(start: set[str], seen: set[str] | None = None) -> set[str]:
    """The files of `start` and of everything they import, with the packages above them
    (modules already in `seen` count but are not read again)."""
    seen = set(seen or ())
    found: set[str] = set()
    todo = list(start)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        found.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # the parent packages
        tree = ast.parse(_module_file(name).read_text())
        todo += sorted(_imports([tree]))
        todo += sorted(_loaded_by_path(name, tree))
    return {_module_file(n).relative_to(REPO_ROOT).as_posix() for n in found}


def _static(stage: str) -> set[str]:
    """What `python -m genderclf.pipeline <stage>` imports: the stage-command module's top
    level, the command's body and the `run_<stage>` glue it calls, then everything those
    reach."""
    tree = ast.parse((PACKAGE / "pipeline.py").read_text())
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    funcs = [
        n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in (stage, f"run_{stage}")
    ]
    assert any(f.name == stage for f in funcs), f"pipeline.py has no command {stage!r}"
    # pipeline.py itself counts, but only the parts of it that this command runs are read
    found = _closure(_imports(top + funcs), seen={"genderclf.pipeline"})
    return found | {"src/genderclf/pipeline.py"}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_deps_cover_what_the_code_imports(stage):
    assert STAGES[stage]["cmd"] == f"python -m genderclf.pipeline {stage}"
    missing = sorted(f for f in _static(stage) if not _covered(f, _deps(stage)))
    assert missing == [], f"dvc.yaml stage {stage!r} misses deps on {missing}"


# The tools and what only they use: editing them must re-run no stage.
TOOLS = (
    "src/genderclf/tools.py",
    "src/genderclf/services.py",
    "src/genderclf/cli.py",
    "src/genderclf/tracking/compare.py",  # genderclf compare
    "src/genderclf/tracking/monitor.py",  # genderclf drift
    "src/genderclf/monitor/drift.py",
)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_no_stage_depends_on_the_tools(stage):
    assert not [f for f in TOOLS if _covered(f, _deps(stage))], STAGES[stage]["deps"]
    assert not set(TOOLS) & _static(stage), f"{stage}'s command reaches a tool module"


def test_every_listed_dep_exists():
    for stage in STAGES:
        for d in STAGES[stage].get("deps", []):
            if d.startswith(("src/", "flows/")):
                assert (REPO_ROOT / d).exists(), f"{stage}: {d} does not exist"


# --- running the commands --------------------------------------------------------------------


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> tuple[Path, dict[str, set[str]]]:
    """A copy of the pipeline after one tiny run of every stage's command, and {stage:
    project files its processes imported}."""
    root = tmp_path_factory.mktemp("traced")
    repo = copy_pipeline(root / "repo")
    write_params(
        repo,
        pipeline_params(
            {
                "data.sample.num_images": 60,
                "split.strategy": "stratified",  # both classes in test: every plot is made
                "base.image_size": 16,
                "train.batch_size": 16,
                "train.epochs_finetune": 0,
                "evaluate.mistakes_grid": 0,
            }
        ),
    )
    out: dict[str, set[str]] = {}
    for stage in STAGES:  # dvc.yaml lists them in pipeline order
        trace = root / "trace" / stage
        trace.mkdir(parents=True)
        env = pipeline_env(
            repo,
            GENDERCLF_IMPORT_TRACE=str(trace),
            PYTHONPATH=f"{TRACE_SITE}:{repo / 'src'}",
            MLFLOW_TRACKING_URI=f"sqlite:///{repo / 'mlflow.db'}",
        )
        run(repo, *shlex.split(STAGES[stage]["cmd"]), env=env)
        files = {line.strip() for f in trace.iterdir() for line in f.read_text().splitlines()[1:]}
        # the project's own files; not the copies of them a logged model carries (the
        # register stage's serving check loads the model from mlruns/, code and all)
        out[stage] = {
            Path(f).relative_to(repo).as_posix()
            for f in files
            if Path(f).is_relative_to(repo / "src") or Path(f).is_relative_to(repo / "flows")
        }
        assert f"src/genderclf/stages/{stage}.py" in out[stage], (stage, sorted(out[stage]))
    return repo, out


@pytest.fixture(scope="module")
def traced(ran) -> dict[str, set[str]]:
    return ran[1]


@pytest.mark.integration
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_deps_cover_what_the_command_imports_when_it_runs(traced, stage):
    missing = sorted(f for f in traced[stage] if not _covered(f, _deps(stage)))
    assert missing == [], f"dvc.yaml stage {stage!r} misses deps on {missing}"
    # what a run imports, reading the code finds too (so the static check is no weaker)
    assert traced[stage] <= _static(stage), sorted(traced[stage] - _static(stage))


@pytest.mark.integration
def test_editing_a_tool_re_runs_no_stage(ran):
    """Edit `genderclf predict`'s help text in a pipeline whose every stage ran: `dvc status`
    stays clean. The same kind of edit in the stage commands' module makes every stage
    stale (so the check can fail)."""
    repo, _ = ran
    env = pipeline_env(repo, MLFLOW_TRACKING_URI=f"sqlite:///{repo / 'mlflow.db'}")
    git_init(repo, env=env)
    dvc(repo, "commit", "--force", env=env)  # dvc.lock of what the stages made, as `repro` would
    assert nothing_stale(dvc(repo, "status", env=env).stdout)

    tools = repo / "src" / "genderclf" / "tools.py"
    before = tools.read_text()
    assert "table (console) | json" in before  # predict --format's help
    tools.write_text(before.replace("table (console) | json", "table (on the console) | json"))
    status = dvc(repo, "status", env=env).stdout
    assert nothing_stale(status), status

    commands = repo / "src" / "genderclf" / "pipeline.py"
    text = commands.read_text()
    commands.write_text(
        text.replace("Split the manifest into", "Split the validated manifest into")
    )
    try:
        assert status_stages(dvc(repo, "status", env=env).stdout) == set(STAGES)
    finally:
        commands.write_text(text)
        tools.write_text(before)
