"""The README's examples, and those of the docs pages in :data:`PAGES`, run as written, in
a fresh folder, as a newcomer would run them.

Every Python block runs, and every shell block marked ``<!-- readme-test: run -->``, in
README order, then page by page in :data:`PAGES` order (a page's examples may use what the
README's made, e.g. ``new_phantoms/`` and ``runs/quick``), in an empty folder that holds only what a clone provides (``.venv`` and
``configs/`` of this checkout, linked). Shell blocks run in bash with the environment
activated (the README's first runnable block activates it, and says the rest assume
so); Python blocks run in this test's interpreter (the same ``.venv``), each in a fresh
namespace, so that torch is imported once. A block marked ``<!-- readme-test: long
(why) -->`` is left out, and the marker must say why; the one long block later
examples depend on, ``dac train --config configs/quick.yaml --out runs/quick`` (30
epochs, minutes), is replaced by the same command on a 1-epoch, 10-image copy of that
config, so that ``dac predict runs/quick/dac ...`` runs as written. A Python block whose
last line is a ``# `` comment after a ``print`` must print that line.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: The pages whose examples run here, in this order, in one folder (docs/transforms.md's
#: examples run in tests/test_transforms.py and tests/test_transforms_monai.py).
PAGES = (README, ROOT / "docs" / "cli.md", ROOT / "docs" / "saliency.md", ROOT / "docs" / "training.md")
TESTED_ELSEWHERE = {"transforms.md"}
MARK = re.compile(r"^<!--\s*readme-test:\s*(run|long)\b(.*?)-->\s*$")
TRAIN_QUICK = "dac train --config configs/quick.yaml --out runs/quick"


@dataclass
class Block:
    line: int  # where the code starts (1-based)
    language: str
    mark: str  # "run", "long" or ""
    why: str
    code: str


def readme_blocks(text: str) -> list[Block]:
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence or not fence.group(1):
            i += 1
            continue
        previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        mark = MARK.match(previous)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        blocks.append(Block(i + 2, fence.group(1), mark.group(1) if mark else "", (mark.group(2).strip() if mark else ""),
                            "\n".join(lines[i + 1:end])))
        i = end + 1
    return blocks


def tiny_quick_config(folder: Path) -> Path:
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "quick.yaml").read_text())
    config["data"] |= {"length": 10, "workers": 0}
    config["model"]["width"] = 4
    config["train"]["holdout"] = 0.0
    for pipeline in config["pipelines"].values():
        pipeline["epochs"] = 1
    path = folder / "tiny-quick.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_blocks_are_marked():
    blocks = readme_blocks(README.read_text())
    assert any(b.language == "python" for b in blocks) and any(b.mark == "run" for b in blocks)
    for b in blocks:
        assert b.language in ("python", "bash"), f"README line {b.line}: a {b.language!r} block"
        assert b.mark != "long" or len(b.why) > 10, f"README line {b.line}: a long block must say why it is left out"
    runnable = [b for b in blocks if b.mark == "run" and b.language == "bash"]
    assert "source .venv/bin/activate" in runnable[0].code  # the environment first, as the README says
    assert any(TRAIN_QUICK in b.code for b in blocks if b.mark == "long")


def test_every_docs_example_is_run_somewhere():
    for page in sorted((ROOT / "docs").rglob("*.md")):
        blocks = readme_blocks(page.read_text())
        runnable = [b for b in blocks if b.language == "python" or b.mark == "run"]
        if runnable and page.name not in TESTED_ELSEWHERE:
            assert page in PAGES, f"{page.relative_to(ROOT)} has examples that no test runs: add it to PAGES"
        for b in blocks:
            assert b.language in ("python", "bash"), f"{page.name} line {b.line}: a {b.language!r} block"
            assert b.mark != "long" or len(b.why) > 10, f"{page.name} line {b.line}: a long block must say why it is left out"


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "dac").exists(), reason="needs the project's .venv (make test sets it up)")
@pytest.mark.skipif(Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(), reason="Python blocks run in .venv's python")
def test_readme_examples_run_as_written(tmp_path: Path, monkeypatch):
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    tiny = tiny_quick_config(tmp_path)
    monkeypatch.chdir(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    log = []

    def shell(code: str, where: str) -> None:
        done = subprocess.run(["bash", "-c", f"set -euo pipefail\nsource .venv/bin/activate\n{code}"], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=900)
        log.append(done.stderr)
        assert done.returncode == 0, f"{where}: the block failed:\n{done.stderr[-3000:]}\n{done.stdout[-2000:]}"

    for page in PAGES:
        name = page.relative_to(ROOT)
        for b in readme_blocks(page.read_text()):
            if b.language == "python" and b.mark != "long":
                printed = io.StringIO()
                with contextlib.redirect_stdout(printed):
                    exec(compile(b.code, f"{name} line {b.line}", "exec"), {"__name__": "__main__"})
                lines = b.code.rstrip().splitlines()
                if len(lines) > 1 and lines[-1].startswith("# ") and lines[-2].startswith("print("):
                    shown = printed.getvalue().rstrip().splitlines()
                    assert shown and shown[-1] == lines[-1][2:], f"{name} line {b.line}: prints {shown[-1:]}, says {lines[-1][2:]!r}"
            elif b.language == "bash" and b.mark == "run":
                shell(b.code, f"{name} line {b.line}")
            elif b.mark == "long" and TRAIN_QUICK in b.code:
                shell(f"dac train --config {tiny.name} --out runs/quick --quiet", f"{name} line {b.line}")
    assert any("accuracy" in err for err in log)  # dac predict on labelled folders
