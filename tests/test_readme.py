"""The README's examples run as written, in a fresh folder, as a newcomer would run them.

Every Python block runs, and every shell block marked ``<!-- readme-test: run -->``, in
README order, as one bash script in an empty folder that holds only what a clone
provides (``.venv`` and ``configs/`` of this checkout, linked). A block marked
``<!-- readme-test: long (why) -->`` is left out, and the marker must say why; the
one long block later examples depend on, ``dac train --config configs/quick.yaml --out
runs/quick`` (30 epochs, minutes), is replaced by the same command on a 1-epoch,
25-image copy of that config, so that ``dac predict runs/quick/dac ...`` runs as written.
A Python block whose last line is a ``# `` comment after a ``print`` must print that line.
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
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
    config["data"] |= {"length": 25, "workers": 0}
    config["model"]["width"] = 4
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


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "dac").exists(), reason="needs the project's .venv (make test sets it up)")
def test_readme_examples_run_as_written(tmp_path: Path):
    blocks = readme_blocks(README.read_text())
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    tiny = tiny_quick_config(tmp_path)
    script = ["set -euo pipefail"]
    expected = {}
    for n, b in enumerate(blocks):
        script.append(f"echo \"=== README block at line {b.line} ($SECONDS s)\" >&2")
        if b.language == "python" and b.mark != "long":
            script.append(f"python - > .block{n}.out <<'README_PYTHON'\n{b.code}\nREADME_PYTHON\ncat .block{n}.out")
            lines = b.code.rstrip().splitlines()
            if len(lines) > 1 and lines[-1].startswith("# ") and lines[-2].startswith("print("):
                expected[n] = (b.line, lines[-1][2:])
        elif b.language == "bash" and b.mark == "run":
            script.append(b.code)
        elif b.mark == "long" and TRAIN_QUICK in b.code:
            script.append(f"dac train --config {tiny.name} --out runs/quick --quiet")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    done = subprocess.run(["bash", "-c", "\n".join(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, f"README example failed:\n{done.stderr[-3000:]}\n{done.stdout[-2000:]}"
    for n, (line, text) in expected.items():
        printed = (tmp_path / f".block{n}.out").read_text().rstrip().splitlines()
        assert printed and printed[-1] == text, f"README line {line}: prints {printed[-1:]} where it says {text!r}"
    assert "accuracy" in done.stderr  # dac predict on labelled folders
    print(re.findall(r"=== README block at line \d+ \(\d+ s\)", done.stderr))
