"""--select-on val|test: which epoch a run keeps, and every output made with test says so."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from cli.train_cli import main
from ogmge_train import train as train_mod
from ogmge_train.config import resolve

EVAL_KEYS = {"loss", "acc", "map", "acc_a", "map_a", "acc_v", "map_v"}
LABEL = "best test epoch, as the reference code"
TINY = ["--preset", "demo", "--epochs", "2", "--batch-size", "8", "--image-size", "32", "--workers", "0",
        "--device", "cpu"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shards(train_shards):
    return train_shards()


def _scripted(monkeypatch, val, test):
    val, test = iter(val), iter(test)

    def scripted(model, cfg, split, device, info, source=None, on_bad_sample=None, on_progress=None):
        acc = next(val if split == "val" else test)
        return {k: acc for k in EVAL_KEYS}

    monkeypatch.setattr(train_mod, "_evaluate_split", scripted)


@pytest.mark.parametrize("select_on,epoch,selection", [("val", 1, "val_acc"), ("test", 2, "test_acc")])
def test_the_selected_epoch_follows_select_on(shards, tmp_path, monkeypatch, select_on, epoch, selection):
    # val peaks at epoch 1, test keeps rising
    _scripted(monkeypatch, [0.2, 0.6, 0.4], [0.1, 0.3, 0.9])
    out = tmp_path / "run"
    cfg = resolve("demo", shards=str(shards), out=str(out), epochs=3, batch_size=8, image_size=32, workers=0,
                  device="cpu", select_on=select_on)
    summary = train_mod.train(cfg)
    assert (summary["selected_epoch"], summary["selection"]) == (epoch, selection)
    assert summary["selection_label"] == ("selected on validation accuracy" if select_on == "val" else LABEL)
    assert summary["test"]["acc"] == [0.1, 0.3, 0.9][epoch]
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == epoch


def test_test_selection_without_a_test_split_keeps_the_last_epoch(shards, tmp_path):
    cfg = resolve("demo", shards=str(shards), out=str(tmp_path / "run"), epochs=2, batch_size=8, image_size=32,
                  workers=0, device="cpu", select_on="test", eval_splits=("val",))
    summary = train_mod.train(cfg)
    assert (summary["selection"], summary["selected_epoch"]) == ("last_epoch", 1)
    assert LABEL not in summary["selection_label"]


def test_every_command_output_made_with_test_selection_says_so(shards, tmp_path):
    run = tmp_path / "run"
    r = CliRunner().invoke(main, ["--shards", str(shards), "--out", str(run), "--select-on", "test", *TINY])
    assert r.exit_code == 0, r.output
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    best = max(records, key=lambda m: m["test"]["acc"])["epoch"]
    assert f"selected epoch {best} ({LABEL})" in r.output

    sweep = tmp_path / "sweep"
    r = CliRunner().invoke(main, ["sweep", "--seeds", "0", "--shards", str(shards), "--out", str(sweep),
                                  "--select-on", "test", *TINY])
    assert r.exit_code == 0, r.output
    assert f"({LABEL})" in r.stdout                  # the mean ± std table's cells

    rep = tmp_path / "report"
    r = CliRunner().invoke(main, ["report", str(run), str(sweep), "--out", str(rep)])
    assert r.exit_code == 0, r.output
    md = (rep / "report.md").read_text()
    assert f"the {LABEL}, the epoch with the highest test accuracy" in md
    lines = md.splitlines()
    sep = next(i for i, ln in enumerate(lines) if ln.startswith("|---"))
    rows = [ln for ln in lines[sep + 1:] if ln.startswith("| ")]
    assert len(rows) == 1 and rows[0].startswith("| run | 2 |")      # one configuration, two runs
    for ln in rows:
        numbers = [c.strip() for c in ln.strip("|").split("|")[2:] if c.strip() != "—"]
        assert numbers and all(c.endswith(f"({LABEL})") for c in numbers), ln

    # a val-selected run next to them carries no such words
    plain = tmp_path / "plain"
    assert CliRunner().invoke(main, ["--shards", str(shards), "--out", str(plain), *TINY]).exit_code == 0
    r = CliRunner().invoke(main, ["report", str(plain), "--out", str(tmp_path / "rep2")])
    assert r.exit_code == 0 and LABEL not in (tmp_path / "rep2" / "report.md").read_text()
