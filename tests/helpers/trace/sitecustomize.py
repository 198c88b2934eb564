"""Loaded at start-up by every Python process whose PYTHONPATH holds this folder.

With GENDERCLF_IMPORT_TRACE set to a folder, each process writes, at exit, its command
line and the file of every module it imported (one per line) into `<folder>/<pid>.txt`.
tests/unit/test_dvc_deps.py uses it to see what each stage's command really imports.
"""

import atexit
import os
import sys

_OUT = os.environ.get("GENDERCLF_IMPORT_TRACE")


def _dump() -> None:
    files = sorted({f for m in list(sys.modules.values()) if (f := getattr(m, "__file__", None))})
    with open(os.path.join(_OUT, f"{os.getpid()}.txt"), "w") as out:
        out.write("\n".join([" ".join(sys.argv), *files]) + "\n")


if _OUT:
    atexit.register(_dump)
