"""The README stays short and the documentation site builds.

README.md is what a newcomer finishes: under 200 lines, with the two commands. The rest
lives in docs/, a MkDocs Material site; it must build with `--strict` (no broken link,
anchor or nav entry) from the locked environment, with no network.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tests.helpers import REPO_ROOT
from tests.helpers.readme import readme_command

README = REPO_ROOT / "README.md"
DOCS = REPO_ROOT / "docs"
MKDOCS = Path(sys.executable).parent / "mkdocs"
# [text](target) and ![alt](target), the target up to a space or the closing parenthesis
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def _relative_links(page: Path) -> list[str]:
    """Link targets in a Markdown page that point at files (not URLs or in-page anchors);
    links inside code blocks and code spans are not links."""
    text = CODE.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    targets = [m.group(1) for m in LINK.finditer(text)]
    return [t for t in targets if not re.match(r"^([a-z][a-z0-9+.-]*:|#|/)", t, re.I)]


def test_readme_is_short_and_names_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 200, (
        "README.md: keep it under 200 lines; move the rest to docs/"
    )
    assert "make demo" in text
    assert "make test" in text


def _layout_tree(text: str) -> set[str]:
    """Paths named by the tree in the README's "Layout" code block (indentation = nesting)."""
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    found: set[str] = set()
    stack: list[tuple[int, str]] = []  # (indent, folder)
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        name = line.split()[0]
        stack = [(i, d) for i, d in stack if i < indent]
        path = "".join(d for _, d in stack) + name
        found.add(path.rstrip("/"))
        if name.endswith("/"):
            stack.append((indent, name))
    return found


def test_readme_layout_names_every_module():
    tree = _layout_tree(README.read_text(encoding="utf-8"))
    modules = [
        p
        for root in ("src/genderclf", "flows")
        for p in (REPO_ROOT / root).rglob("*.py")
        if p.name != "__init__.py"
    ]
    missing = sorted(
        m.relative_to(REPO_ROOT).as_posix()
        for m in modules
        if m.relative_to(REPO_ROOT).as_posix() not in tree
    )
    assert missing == [], f"README.md's layout tree lacks {missing}"
    stale = sorted(p for p in tree if p.endswith(".py") and not (REPO_ROOT / p).is_file())
    assert stale == [], f"README.md's layout tree names modules that do not exist: {stale}"


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_relative_links_point_at_files_that_exist(page):
    missing = []
    for target in _relative_links(page):
        path = target.split("#", 1)[0]
        if path and not (page.parent / path).exists():
            missing.append(target)
    assert missing == [], f"{page.relative_to(REPO_ROOT)}: links to missing files {missing}"


def test_the_link_check_sees_links():
    """The checker finds the README's links into docs/ (so an empty result means no links)."""
    assert any(t.startswith("docs/") for t in _relative_links(README))


def test_mkdocs_builds_strict(tmp_path):
    assert MKDOCS.is_file(), f"{MKDOCS} missing: run `make setup` (mkdocs is a dev dependency)"
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [str(MKDOCS), "build", "--strict", "--site-dir", str(site)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (site / "index.html").is_file()
    for page in DOCS.rglob("*.md"):
        html = site / page.relative_to(DOCS).with_suffix(".html")
        assert html.is_file(), f"{page.name} was not built (is it in mkdocs.yml's nav?)"


# --- the README's commands after the demo ------------------------------------------------------


def _git_tracked_outputs() -> list[str]:
    """What the stages write for git rather than the DVC cache (`cache: false`)."""
    import yaml

    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    out = []
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                if isinstance(entry, dict):
                    out += [p for p, opts in entry.items() if (opts or {}).get("cache") is False]
    return sorted(out)


def test_the_readme_commit_step_takes_every_git_tracked_output():
    """`git add ...` before `dvc exp run`: dvc.lock and every output DVC leaves to git,
    or the experiment's baseline shows `!` and `git status` lists them untracked."""
    add = readme_command("git add ").split("&&")[0].split()[2:]
    outputs = ["dvc.lock", *_git_tracked_outputs()]
    assert any(p.startswith("plots/") for p in outputs)
    missing = [
        p for p in outputs if not any(p == a or p.startswith(a.rstrip("/") + "/") for a in add)
    ]
    assert missing == [], f"README's `git add {' '.join(add)}` leaves {missing} untracked"


def test_the_readme_exp_show_keeps_the_param_the_experiment_sets():
    """The `dvc exp show` command's --keep pattern keeps the key `dvc exp run -S` sets
    (the column width is checked on a real table in tests/e2e/test_demo_run.py)."""
    run = readme_command("uv run dvc exp run -S ")
    key = run.split("-S ", 1)[1].split("=", 1)[0]
    show = readme_command("uv run dvc exp show ")
    keep = re.search(r"--keep '([^']+)'", show).group(1)
    # DVC names the column `params.yaml:<key>`: params/tuned.yaml has the train keys too
    assert re.search(keep, f"params.yaml:{key}"), (keep, key)


def test_the_readme_names_outputs_where_the_pipeline_writes_them():
    from genderclf.config import PATHS

    section = README.read_text(encoding="utf-8").split("## What you get after the demo")[1]
    section = section.split("\n## ", 1)[0]
    named = set(re.findall(r"`((?:reports|plots|metrics|models|data)/[^`\s]*)`", section))
    assert str(PATHS.data_docs / "index.html") in named and str(PATHS.validation_report) in named
    written = {str(getattr(PATHS, f)) for f in vars(PATHS)} | {
        str(PATHS.data_docs / "index.html"),
        str(PATHS.validation_report),
        str(PATHS.rejected),
    }
    stray = sorted(
        n for n in named if not any(n.rstrip("/") == w or n.startswith(w + "/") for w in written)
    )
    assert stray == [], f"README.md names outputs the pipeline does not write: {stray}"
