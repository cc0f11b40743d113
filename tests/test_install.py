"""Installing dac into one's own environment: what pyproject.toml promises and what ``import dac`` says.

The full recipe (a fresh venv, torch, theseus-ai, ``pip install .``) runs in CI as
``make install-check``; these tests check its two halves cheaply.
"""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_theseus_is_not_a_declared_dependency_but_its_needs_are():
    # theseus-ai 0.2.3's metadata asks for scikit-sparse, whose build needs SuiteSparse headers:
    # declared, it makes `pip install .` fail on a machine without them
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = " ".join(project["dependencies"])
    assert "theseus" not in declared
    for need in ("scipy", "semantic-version", "torchlie", "torchkin"):
        assert need in declared


def test_import_without_theseus_says_how_to_install_it_in_one_line():
    # a meta-path finder that hides theseus, as in an environment where it was never installed
    code = (
        "import sys, importlib.abc\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'theseus' or name.startswith('theseus.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "import dac\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: dac needs theseus-ai 0.2.3")
    assert "pip install --no-build-isolation --no-deps theseus-ai==0.2.3" in last
