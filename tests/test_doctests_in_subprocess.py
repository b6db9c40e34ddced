"""Doctests of modules that cannot be imported into the test process.

``xslim_xdit.integrations.xfuser`` applies xfuser's CPU compatibility layer when imported
(process-wide), so the root ``conftest.py`` keeps it out of ``--doctest-modules`` collection and
its examples run here, in a fresh interpreter, with :func:`doctest.testmod`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["xslim_xdit.integrations.xfuser"])
def test_module_doctests_pass_in_a_subprocess(module: str) -> None:
    code = (
        "import doctest, importlib, sys\n"
        f"result = doctest.testmod(importlib.import_module({module!r}))\n"
        "print(result)\n"
        "sys.exit(1 if result.failed or not result.attempted else 0)\n"
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
    assert "failed=0" in res.stdout
