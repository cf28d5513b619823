"""Every fenced code block of README.md and docs/*.md runs as written, or says why it cannot.

Each block is one test, named ``file:line`` (the line of its opening fence). What a block is comes from its
language and from an optional HTML comment on the line right before the fence:

- ```` ```python ````: run with the package's Python in a fresh scratch folder (the repository is not on
  ``sys.path`` there, as for a user of the installed package); a non-zero exit fails the test.
- ```` ```bash ```` / ```` ```sh ```` / ```` ```console ````: run with ``bash -eo pipefail`` in a fresh scratch
  folder, with the package's ``metaplastic``, ``python`` and ``torchrun`` first on ``PATH`` (console
  blocks: only the ``$ `` lines).
- ``<!-- setup -->`` before a runnable block: it makes the inputs of the blocks after it on the same page;
  every later runnable block of the page starts in a folder where the page's setup blocks have run.
- ``<!-- output -->`` before a block: what the runnable block above it prints. That block's test compares
  its standard output with it line by line, with every decimal number (one holding ``.`` or an exponent)
  masked, since those depend on the random weights and the machine; integers and text must match.
- ``<!-- synopsis -->`` before a block of ``metaplastic COMMAND [--option ...]`` lines: the set of options
  shown must equal the set the command's parser defines (``-h`` aside), so a synopsis cannot go stale.
- ``<!-- needs: WHAT — reason -->`` (``gpu``, ``multi-node``, ``network``, ``long``, ...): skipped, with that
  reason as the skip message.
- ```` ```text ```` and ```` ```bibtex ````: not code (formulas, citations).

Any other block (no language, another language) fails: it must say what it is.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
RUNNABLE = {"python", "bash", "sh", "console"}
NOT_CODE = {"text", "bibtex"}
TIMEOUT_S = 300  # per block; the longest (fine-tuning under torchrun) takes well under a minute

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)\s*$")
_MARKER = re.compile(r"^\s*<!--\s*(?P<kind>needs|output|synopsis|setup)\b\s*:?\s*(?P<arg>.*?)\s*-->\s*$")
_DECIMAL = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)|[-+]?(?:\d+\.\d*|\.\d+)")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    kind: Optional[str]  # the marker before the fence: needs, output, synopsis, setup, or None
    arg: str  # the marker's text after its kind

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT).as_posix()}:{self.line}"


def parse_blocks(page: Path) -> List[Block]:
    """The fenced blocks of one markdown page, in order."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent, start = m.group("fence"), len(m.group("indent")), i
        body = []
        i += 1
        while i < len(lines) and not (lines[i].strip().startswith(fence) and lines[i].strip().strip(fence[0]) == ""):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        marker = _MARKER.match(lines[start - 1]) if start > 0 else None
        blocks.append(Block(page, start + 1, m.group("lang").lower(), "\n".join(body) + "\n",
                            marker.group("kind") if marker else None, marker.group("arg") if marker else ""))
        i += 1
    return blocks


BLOCKS = [b for page in PAGES for b in parse_blocks(page)]


def _is_runnable(block: Block) -> bool:
    return block.lang in RUNNABLE and block.kind in (None, "setup")


def _environment() -> Dict[str, str]:
    """The user's environment, with the package's scripts first on PATH and no test-suite settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTEST_XDIST_WORKER")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def _command(block: Block) -> List[str]:
    if block.lang == "python":
        return [sys.executable, "-c", block.text]
    text = block.text
    if block.lang == "console":
        text = "\n".join(line[2:] for line in text.splitlines() if line.startswith("$ ")) + "\n"
    return ["bash", "-eo", "pipefail", "-c", text]


def _run(block: Block, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(_command(block), cwd=cwd, env=_environment(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    if proc.returncode != 0:
        pytest.fail(f"{block.id} exited with {proc.returncode}\n--- block ---\n{block.text}"
                    f"--- stdout (tail) ---\n{proc.stdout[-3000:]}\n--- stderr (tail) ---\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def setup_folders(tmp_path_factory) -> Dict[str, Path]:
    """block id of a setup block -> a folder where it and the setup blocks above it on its page have run."""
    return {}


def _prepared_folder(block: Block, tmp_path: Path, cache: Dict[str, Path], factory) -> Path:
    """A fresh folder in which every setup block of the page above ``block`` (and ``block`` itself, if it is one)
    has run; each setup runs once per session."""
    setups = [b for b in BLOCKS if b.page == block.page and b.kind == "setup"
              and (b.line < block.line or b == block)]
    if setups:
        last = setups[-1]
        if last.id not in cache:
            folder = factory.mktemp("setup")
            for s in setups:
                _run(s, folder)
            cache[last.id] = folder
        shutil.copytree(cache[last.id], tmp_path, dirs_exist_ok=True, symlinks=True)
    return tmp_path


def _masked(text: str) -> List[str]:
    return [_DECIMAL.sub("<num>", line.rstrip()) for line in text.strip().splitlines()]


def _following_output(block: Block) -> Optional[Block]:
    i = BLOCKS.index(block)
    nxt = BLOCKS[i + 1] if i + 1 < len(BLOCKS) else None
    return nxt if nxt is not None and nxt.page == block.page and nxt.kind == "output" else None


def _preceding(block: Block) -> Optional[Block]:
    i = BLOCKS.index(block)
    prev = BLOCKS[i - 1] if i > 0 else None
    return prev if prev is not None and prev.page == block.page else None


def _parser_options(command: List[str]) -> set:
    """The option strings that ``metaplastic COMMAND`` accepts (``-h``/``--help`` aside)."""
    from metaplastic.cli import BENCHES, COMMANDS
    module = BENCHES[command[1]][0] if command[0] == "bench" else COMMANDS[command[0]][0]
    parser = argparse.ArgumentParser()
    importlib.import_module(module).add_arguments(parser)
    return {opt for action in parser._actions for opt in action.option_strings if opt.startswith("--")} - {"--help"}


def _check_synopsis(block: Block) -> None:
    """The ``metaplastic CMD ...`` lines (with their continuation lines) of each CMD show exactly its options."""
    entries: List[List[str]] = []
    for line in block.text.splitlines():
        if line.startswith("metaplastic "):
            entries.append([line])
        elif entries and line.strip():
            entries[-1].append(line)
    assert entries, f"{block.id}: a synopsis block holds `metaplastic COMMAND ...` lines"
    shown_by_command: Dict[tuple, set] = {}
    for entry in entries:
        words = entry[0].split()
        command = tuple(words[1:3] if words[1] == "bench" else words[1:2])
        shown_by_command.setdefault(command, set()).update(re.findall(r"--[a-z][a-z0-9-]*", " ".join(entry)))
    for command, shown in shown_by_command.items():
        defined = _parser_options(list(command))
        assert shown == defined, (f"{block.id}: synopsis of `metaplastic {' '.join(command)}`: "
                                  f"missing {sorted(defined - shown)}, not an option {sorted(shown - defined)}")


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_block(block: Block, tmp_path: Path, setup_folders, tmp_path_factory) -> None:
    if block.kind == "needs":
        pytest.skip(f"needs {block.arg}")
    if block.kind == "output":
        prev = _preceding(block)
        assert prev is not None and _is_runnable(prev), f"{block.id}: an output block follows the block it is output of"
        pytest.skip(f"output of {prev.id}, compared there")
    if block.kind == "synopsis":
        _check_synopsis(block)
        return
    if block.lang in NOT_CODE:
        pytest.skip(f"not code ({block.lang})")
    assert block.lang in RUNNABLE, (
        f"{block.id}: a fenced block says what it is: ```python / ```bash (run here), ```text / ```bibtex (not code), "
        f"or a marker on the line before it (<!-- needs: ... -->, <!-- output -->, <!-- synopsis -->); "
        f"found language {block.lang!r}")
    folder = _prepared_folder(block, tmp_path, setup_folders, tmp_path_factory)
    if block.kind == "setup":
        return  # it ran (and succeeded) in preparing the folder
    proc = _run(block, folder)
    output = _following_output(block)
    if output is not None:
        expected, got = _masked(output.text), _masked(proc.stdout)
        assert got == expected, (f"{block.id} prints other lines than its output block {output.id} "
                                 f"(decimal numbers masked)\n--- expected ---\n" + "\n".join(expected)
                                 + "\n--- printed ---\n" + "\n".join(got))


def test_markers_are_known() -> None:
    """A misspelt marker would silently turn a skip into a run or hide a block: every `<!-- word` before a fence
    is one of the markers above."""
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines[1:], start=1):
            if _FENCE.match(line) and lines[i - 1].strip().startswith("<!--"):
                assert _MARKER.match(lines[i - 1]), f"{page.name}:{i}: unknown marker {lines[i - 1].strip()!r}"


def test_parser_finds_blocks(tmp_path: Path) -> None:
    """The extraction itself: a page with a marked, an indented and an output block."""
    page = tmp_path / "page.md"
    page.write_text("x\n<!-- needs: gpu — cuda only -->\n```bash\nnvidia-smi\n```\n\n  ```python\n  print(1)\n  ```\n"
                    "<!-- output -->\n```\n1\n```\n", encoding="utf-8")
    blocks = parse_blocks(page)
    assert [(b.line, b.lang, b.kind, b.arg, b.text) for b in blocks] == [
        (3, "bash", "needs", "gpu — cuda only", "nvidia-smi\n"), (7, "python", None, "", "print(1)\n"),
        (11, "", "output", "", "1\n")]
    assert _masked("err 4.8e-07 at 2.08, shape [2, 64]") == ["err <num> at <num>, shape [2, 64]"]
