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


def test_import_does_not_load_dynamo():
    # DACrop's torch.compile guard, applied with torch.compiler.disable at import, loaded
    # dynamo: +1.3 s and +150 MB for every `import dac` (each command, each loader worker)
    code = "import sys, dac; print('torch._dynamo' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_the_shipped_saliency_stage_is_package_data_and_loads_weights_only():
    import json

    from dac.saliency import SHIPPED_STAGE, SaliencyNet, load_dacrop

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["dac.saliency"]
    assert SHIPPED_STAGE.name in data and "phantoms-fit.json" in data  # a non-editable install carries both
    layer = load_dacrop(SHIPPED_STAGE)  # torch.load(weights_only=True) inside
    assert isinstance(layer.saliency, SaliencyNet) and layer.output_size == (200, 370) and layer.pool_size == 10
    fit = json.loads(SHIPPED_STAGE.with_name("phantoms-fit.json").read_text())
    assert fit["command"].startswith("dac fit-saliency ") and fit["fit"]["images"] == 32
    assert fit["fit"]["dacrop"]["search"] == layer.search_method  # the record says how the shipped file was made
