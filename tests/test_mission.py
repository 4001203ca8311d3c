"""The mission's four usages, typed literally with their defaults in a fresh folder:

    avprep extract --dataset cremad --src raw/ --out shards/
    avprep verify
    ogmge-train --shards shards/ --fusion concat
    ogmge-train --shards s3://BUCKET/cremad --fusion concat      (a local S3-compatible server)

Each is the installed console script in a subprocess, as a user runs it from a shell (stderr
a file: what a log gets). The raw data are 84 synthetic CREMA-D clips (69 train samples: one
batch of the default 64). The default training (two ResNet-18s, 224-px frames, 100 epochs)
runs as typed and is stopped with Ctrl-C once its first epoch is saved; the S3 run adds only
``--epochs 1``. Each training test costs about 40 s of CPU (one optimizer step of the paper
model and a data loader per split).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from avprep import synth
from ogmge_train import train as train_mod

BIN = Path(sys.executable).parent
CLIPS = 84


def _command(name: str) -> str:
    exe = BIN / name
    if not exe.exists():
        pytest.skip(f"{exe}: console scripts not installed (make install)")
    return str(exe)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AVPREP_", "OGMGE_"))}
    env.pop("AWS_ENDPOINT_URL", None)
    return {**env, **extra}


def _run(folder: Path, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([_command(argv[0]), *argv[1:]], cwd=folder, env=env or _env(), capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def mission(tmp_path_factory):
    """A folder holding raw/ (the only thing not made by a mission command) and what
    ``avprep extract --dataset cremad --src raw/ --out shards/`` made of it."""
    folder = tmp_path_factory.mktemp("mission")
    synth.make_dataset("cremad", folder / "raw", CLIPS)
    extracted = _run(folder, "avprep", "extract", "--dataset", "cremad", "--src", "raw/", "--out", "shards/")
    return folder, extracted


def test_extract_then_verify_without_an_argument(mission):
    folder, extracted = mission
    assert extracted.returncode == 0, extracted.stderr
    assert f"{CLIPS} samples in 3 shard(s), 0 failed → shards" in extracted.stdout
    meta = json.loads((folder / "shards" / "dataset.json").read_text())
    assert meta["name"] == "cremad" and sum(meta["splits"].values()) == CLIPS
    assert meta["config"]["frame_size"] == 256 and meta["config"]["spec"]["preset"] == "paper"   # the defaults
    before = sorted(p.name for p in folder.iterdir())

    verified = _run(folder, "avprep", "verify")
    assert verified.returncode == 0, verified.stderr
    assert verified.stderr.splitlines()[0] == "verifying shards (the last extraction here)"
    assert verified.stdout.strip() == f"✓ 3 shards, {CLIPS} samples verified"
    assert sorted(p.name for p in folder.iterdir()) == before          # nothing left behind

    elsewhere = _run(folder / "raw", "avprep", "verify")
    assert elsewhere.returncode == 2
    assert elsewhere.stderr.strip().splitlines() == [
        "error: no extraction output here (a folder holding .avprep-state/ in . or a folder in it): pass one, "
        "e.g. `avprep verify shards/` or `avprep verify s3://bucket/prefix`"]


def test_train_with_every_default_until_ctrl_c(mission):
    folder, extracted = mission
    assert extracted.returncode == 0, extracted.stderr
    run = folder / "runs" / "cremad-concat-ogm-ge-1"
    assert not (folder / "runs").exists()
    with open(folder / "train.out", "w") as out, open(folder / "train.err", "w") as err:
        proc = subprocess.Popen([_command("ogmge-train"), "--shards", "shards/", "--fusion", "concat"],
                                cwd=folder, env=_env(), stdout=out, stderr=err)
        try:
            deadline = time.monotonic() + 500
            while not (run / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert proc.poll() is None, (folder / "train.err").read_text()
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    stderr = (folder / "train.err").read_text()
    assert proc.returncode == 130, stderr
    lines = stderr.splitlines()
    assert lines[0] == "run folder: runs/cremad-concat-ogm-ge-1"
    assert lines[-1] == ("error: interrupted; finished epochs are kept: `ogmge-train --shards shards/ --fusion concat "
                         "--out runs/cremad-concat-ogm-ge-1 --resume` continues from the last one")
    config = json.loads((run / "config.json").read_text())
    paper = {"arch": "resnet18", "epochs": 100, "batch_size": 64, "image_size": 224, "optimizer": "sgd",
             "lr": 1e-3, "fusion": "concat", "modulation": "ogm-ge", "alpha": 0.8, "frames": 1,
             "out": "runs/cremad-concat-ogm-ge-1", "shards": str((folder / "shards").resolve())}
    assert {k: config[k] for k in paper} == paper
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0]
    assert sorted(p.name for p in (folder / "runs").iterdir()) == ["cremad-concat-ogm-ge-1"]


def test_train_from_a_local_s3_server(mission, s3_server, tmp_path):
    folder, extracted = mission
    assert extracted.returncode == 0, extracted.stderr
    bucket = s3_server.new_bucket()
    env = _env(AWS_ENDPOINT_URL=s3_server.endpoint)
    uploaded = _run(folder, "avprep", "upload", "shards/", f"s3://{bucket}/cremad", env=env)
    assert uploaded.returncode == 0, uploaded.stderr

    trained = _run(tmp_path, "ogmge-train", "--shards", f"s3://{bucket}/cremad", "--fusion", "concat",
                   "--epochs", "1", env=env)
    assert trained.returncode == 0, trained.stderr
    assert trained.stderr.splitlines()[0] == "run folder: runs/cremad-concat-ogm-ge-1"
    assert "selected epoch 0 (by val accuracy)" in trained.stdout
    run = tmp_path / "runs" / "cremad-concat-ogm-ge-1"
    assert json.loads((run / "config.json").read_text())["shards"] == f"s3://{bucket}/cremad"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["selected_epoch"] == 0
    # what was read from the bucket scores exactly as the local folder it was uploaded from
    local = train_mod.evaluate(run, split="test", which="best", shards=str(folder / "shards"), device="cpu",
                               workers=0)
    assert local == pytest.approx(summary["test"], abs=1e-6)
