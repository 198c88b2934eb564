"""`genderclf`: the stage commands and the tools, in one command for people.

* the stage commands, `genderclf download` ... `genderclf register`: `genderclf.pipeline`,
  the module `dvc.yaml` runs (`python -m genderclf.pipeline <stage>`);
* the tools, `genderclf predict`, `drift`, `promote`, `rollback`, `compare`:
  `genderclf.tools`, which no stage depends on.

Nothing imports this module; it only puts the two sets together.
"""

from __future__ import annotations

import typer

from genderclf import pipeline, tools

app = typer.Typer(
    help="Retraining pipeline for a face-image gender classifier. Stages run in order: "
    "download -> validate -> split -> augment -> train -> evaluate -> register "
    "(`dvc repro` runs them; each command here runs one), plus the tools predict, drift, "
    "promote, rollback and compare.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.registered_commands += pipeline.app.registered_commands + tools.app.registered_commands


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
