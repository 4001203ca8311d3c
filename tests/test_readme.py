"""Every README code block that starts with ``$ command`` is run, in order, in one temporary
folder, and its output compared with the block: so the README cannot drift from the code.

Block format (a fenced block)::

    $ avprep synth --dataset cremad --out raw --clips 200
    wrote 200 cremad clips to raw
    $ ogmge-train evalute runs/x
    ...
    [exit 2]

Each ``$`` line is one command (``avprep`` and ``ogmge-train`` run as the installed console
scripts, stdout and stderr together); the lines up to the next ``$`` are its output; ``[exit N]``
is its exit status (0 when absent). Compared: every non-blank line, with trailing spaces
stripped and rates (``89.3 clips/s``, ``24 samples/s``) and elapsed times (``(2.2 s,``)
masked. A block right after ``<!-- readme-test: slow -->`` is marked slow (``make test-all``);
later fast blocks must not depend on it (``-m slow`` runs the fast blocks before a slow block
first, without comparing them).

``README_UPDATE=1 pytest tests/test_readme.py -m "slow or not slow"`` rewrites each block's
output from what the commands print (review the diff before committing).
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SLOW_MARK = "<!-- readme-test: slow -->"
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
_EXIT = re.compile(r"^\[exit (\d+)\]$")
_MASKS = [(re.compile(r"\d+(?:\.\d+)? (clips|samples|steps|items|bytes)/s"), r"<rate> \1/s"),
          (re.compile(r"\(\d+(?:\.\d+)? s,"), "(<time> s,")]


@dataclass
class Step:
    command: str
    output: list[str] = field(default_factory=list)
    exit: int = 0


@dataclass
class Block:
    index: int
    line: int                  # line number of the opening fence in README.md
    text: str                  # the block's content, as in the README
    steps: list[Step]
    slow: bool


def parse(text: str) -> list[Block]:
    blocks = []
    for m in _FENCE.finditer(text):
        body = m.group(1)
        if not body.startswith("$ "):
            continue
        steps: list[Step] = []
        for line in body.splitlines():
            if line.startswith("$ "):
                steps.append(Step(line[2:].strip()))
            elif (e := _EXIT.match(line.strip())) is not None:
                steps[-1].exit = int(e.group(1))
            else:
                steps[-1].output.append(line)
        before = text[:m.start()].rstrip().splitlines()
        slow = bool(before) and before[-1].strip() == SLOW_MARK
        blocks.append(Block(len(blocks), text.count("\n", 0, m.start()) + 1, body, steps, slow))
    return blocks


def normalise(lines) -> list[str]:
    out = []
    for line in lines:
        line = line.rstrip()
        if not line.strip():
            continue
        for pattern, repl in _MASKS:
            line = pattern.sub(repl, line)
        out.append(line)
    return out


def _argv(command: str) -> list[str]:
    argv = shlex.split(command)
    script = Path(sys.executable).parent / argv[0]
    if argv[0] not in ("avprep", "ogmge-train"):
        raise AssertionError(f"README runs only avprep and ogmge-train, not {argv[0]!r}")
    if script.exists():
        return [str(script), *argv[1:]]
    module = {"avprep": "cli.avprep_cli", "ogmge-train": "cli.train_cli"}[argv[0]]
    return [sys.executable, "-m", module, *argv[1:]]


def run(step: Step, cwd: Path) -> tuple[int, list[str]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "AVPREP_PROGRESS_INTERVAL": "1000000000", "OMP_NUM_THREADS": "1"}
    env.pop("AVPREP_PROGRESS", None)
    r = subprocess.run(_argv(step.command), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=1800)
    return r.returncode, r.stdout.splitlines()


BLOCKS = parse(README.read_text())


def test_readme_has_command_blocks():
    assert len(BLOCKS) >= 2 and any(not b.slow for b in BLOCKS)
    # a block without commands before its first output line would be silently skipped
    assert all(b.steps and b.steps[0].command for b in BLOCKS)


@dataclass
class Workdir:
    path: Path
    ran: set[int] = field(default_factory=set)      # blocks whose commands ran here


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return Workdir(tmp_path_factory.mktemp("readme"))


@pytest.mark.parametrize("block", [pytest.param(b, id=f"line{b.line}", marks=[pytest.mark.slow] if b.slow else [])
                                   for b in BLOCKS])
def test_readme_block(block: Block, workdir):
    # a block may use what the fast blocks before it made: run those first when they were not
    # selected (`pytest -m slow` runs the slow blocks alone) or ran in another xdist worker (each
    # worker gets its tests in collection order, so a block never comes after a later one here)
    for earlier in BLOCKS[:block.index]:
        if not earlier.slow and earlier.index not in workdir.ran:
            for step in earlier.steps:
                run(step, workdir.path)
            workdir.ran.add(earlier.index)
    workdir.ran.add(block.index)
    actual_text = []
    for step in block.steps:
        code, lines = run(step, workdir.path)
        actual_text += [f"$ {step.command}", *lines] + ([f"[exit {code}]"] if code else [])
        if os.environ.get("README_UPDATE") == "1":
            continue
        assert code == step.exit, f"README line {block.line}: `{step.command}` exited {code}:\n" + "\n".join(lines)
        assert normalise(lines) == normalise(step.output), f"README line {block.line}: `{step.command}`"
    if os.environ.get("README_UPDATE") == "1":
        text = README.read_text()
        new = "\n".join(line.rstrip() for line in actual_text) + "\n"
        README.write_text(text.replace(block.text, new, 1))


def test_parse_and_normalise():
    text = ("x\n\n" + SLOW_MARK + "\n```\n$ avprep a b\nout 1 (2.2 s, 89.3 clips/s)\n[exit 2]\n$ ogmge-train c\n```\n"
            "```\nnot a command\n```\n```\n$ avprep d\n```\n")
    blocks = parse(text)
    assert [b.slow for b in blocks] == [True, False]
    assert blocks[0].line == 4
    a, c = blocks[0].steps
    assert (a.command, a.exit, c.command, c.output, c.exit) == ("avprep a b", 2, "ogmge-train c", [], 0)
    assert normalise(a.output + ["", "x  "]) == ["out 1 (<time> s, <rate> clips/s)", "x"]
