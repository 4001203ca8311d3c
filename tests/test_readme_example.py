"""The README's first three commands, unchanged but for a short --epochs, train: samples, not
shards, are partitioned, so 1 train shard feeds 1 rank × the default 2 loader workers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _cli(name: str) -> list[str]:
    exe = Path(sys.executable).parent / name
    return [str(exe)] if exe.exists() else [sys.executable, "-m", {"avprep": "cli.avprep_cli",
                                                                    "ogmge-train": "cli.train_cli"}[name]]


@pytest.mark.slow
def test_readme_commands_train(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}

    def run(*args):
        r = subprocess.run([*args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

    run(*_cli("avprep"), "synth", "--dataset", "cremad", "--out", "raw", "--clips", "200")
    run(*_cli("avprep"), "extract", "--dataset", "cremad", "--src", "raw", "--out", "shards")
    assert len(json.loads((tmp_path / "shards" / "train.manifest.json").read_text())["shards"]) == 1
    run(*_cli("ogmge-train"), "--shards", "shards", "--fusion", "concat", "--out", "runs/x", "--epochs", "1")
    assert len((tmp_path / "runs" / "x" / "metrics.jsonl").read_text().splitlines()) == 1
