"""README.md's code runs as written.

Every ```python block of README.md runs, verbatim and on its own, in a fresh interpreter (a
temporary working directory, one thread). Every ```bash block runs (in a temporary directory too) unless
the line right above it (HTML comments may be stacked) says
``<!-- readme-test: skip (why) -->``; such a marker must give a reason and may only stand before
a bash block (Python examples are never skipped: keep them small enough to run in seconds). An
unmarked bash block that installs (pip), builds (cmake) or starts pytest fails without running.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\s*$")
COMMENT = re.compile(r"^\s*<!--.*-->\s*$")
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\b(.*?)-->")
REASON = re.compile(r"^\s*\((.*\S.*)\)\s*$")
# never run unmarked: a block that installs or starts the test suite (which runs this test again)
UNSAFE = re.compile(r"\bpip\b|\bpytest\b|\bcmake\b|\.ci/run")
TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    """One fenced block of README.md: its language, first line number (1-based), code and the
    ``readme-test: skip`` marker text above it (None when unmarked)."""

    lang: str
    line: int
    code: str
    skip: str | None


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block of ``text`` with the skip marker among the comment lines above it."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        skip, k = None, i - 1
        while k >= 0 and COMMENT.match(lines[k]):
            marker = SKIP.search(lines[k])
            if marker:
                skip = marker.group(1)
            k -= 1
        blocks.append(Block(opening.group(1), i + 2, "\n".join(lines[i + 1:end]), skip))
        i = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text())
PYTHON = [b for b in BLOCKS if b.lang == "python"]
BASH = [b for b in BLOCKS if b.lang == "bash" and b.skip is None]


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", SPARSEODE_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("TRITON_INTERPRET", None)  # as a user runs it
    return env


def _run(cmd: list[str], cwd: Path, tmp_path: Path, block: Block) -> None:
    result = subprocess.run(cmd, cwd=cwd, env=_env(tmp_path), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, (
        f"README.md block at line {block.line} ({block.lang}) failed with exit code {result.returncode}:\n"
        f"--- code ---\n{block.code}\n--- stdout (tail) ---\n{result.stdout[-3000:]}\n"
        f"--- stderr (tail) ---\n{result.stderr[-3000:]}")


def test_blocks_and_markers_are_parsed():
    text = ("intro\n<!-- ci:install -->\n<!-- readme-test: skip (installs) -->\n```bash\npip install x\n```\n"
            "```python\nprint(1)\nprint(2)\n```\n\n<!-- readme-test: skip -->\n\n```bash\nls\n```\n```\nout\n```\n")
    blocks = readme_blocks(text)
    assert [(b.lang, b.line, b.code) for b in blocks] == [
        ("bash", 5, "pip install x"), ("python", 8, "print(1)\nprint(2)"), ("bash", 15, "ls"), ("", 18, "out")]
    # the marker binds only to the block right below it (a blank line breaks the binding)
    assert [b.skip for b in blocks] == [" (installs) ", None, None, None]
    assert REASON.match(blocks[0].skip).group(1) == "installs"
    assert not REASON.match(" ")


def test_the_readme_has_code_to_run():
    assert len(PYTHON) >= 1, "no ```python block found in README.md (the parser or the README broke)"
    assert all(b.code.strip() for b in BLOCKS if b.lang in ("python", "bash")), "an empty code block"


def test_every_skipped_block_says_why():
    for block in BLOCKS:
        if block.skip is None:
            continue
        assert block.lang == "bash", f"line {block.line}: only bash blocks may be skipped, not {block.lang or 'plain'}"
        assert REASON.match(block.skip), (
            f"line {block.line}: a skipped block needs a reason: <!-- readme-test: skip (why) -->, got {block.skip!r}")


@pytest.mark.slow
@pytest.mark.parametrize("block", PYTHON, ids=lambda b: f"line{b.line}")
def test_python_block_runs(block, tmp_path):
    _run([sys.executable, "-c", block.code], tmp_path, tmp_path, block)


@pytest.mark.parametrize("block", BASH, ids=lambda b: f"line{b.line}")
def test_bash_block_runs(block, tmp_path):
    unsafe = UNSAFE.search(block.code)
    assert unsafe is None, (f"README.md line {block.line}: a block that runs {unsafe.group(0)!r} must be "
                            "marked <!-- readme-test: skip (why) -->")
    _run(["bash", "-e", "-o", "pipefail", "-c", block.code], tmp_path, tmp_path, block)
