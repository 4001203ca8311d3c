"""`reproduce`: a paper table's rows x seeds on tiny synthetic shards, next to the paper's values."""
from __future__ import annotations

import json

import pytest

from ogmge_train.errors import ConfigError
from ogmge_train import reproduce as rp

TINY = {"epochs": 1, "batch_size": 8, "image_size": 24, "arch": "small", "workers": 0, "device": "cpu"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from avprep.config import ExtractConfig, spec_preset
    from avprep.extract import extract
    from avprep.synth import make_dataset

    root = tmp_path_factory.mktemp("repro")
    make_dataset("cremad", root / "raw", 36, num_classes=3, duration=1.0, fps=2, size=(32, 24),
                 audio_snr=0.0, visual_snr=0.0)
    spec = spec_preset("paper", "cremad", n_fft=64, win_length=64, hop_length=400, duration=1.0)
    extract("cremad", root / "raw", root / "shards", ExtractConfig(spec, frame_size=24), workers=1, seed=3)
    return root / "shards"


def test_rows_are_the_papers_and_paper_values_are_data():
    assert [r.name for r in rp.TABLE_ROWS[2]] == ["concat", "modality-drop-audio", "modality-drop-visual",
                                                  "gradient-blending", "ogm", "ogm-ge"]
    assert [r.name for r in rp.TABLE_ROWS[1]] == [n for f in ("concat", "sum", "film", "gated")
                                                  for n in (f, f"{f}+ogm-ge")]
    assert all(rp.unavailable(r.name, r.settings) is None for r in rp.TABLE_ROWS[1])
    gb = rp.paper_values(2, "cremad")["gradient-blending"]
    assert gb["acc"] == 56.8 and rp.paper_values(2, "kinetics-sounds")["gradient-blending"]["acc"] == 62.2
    for table in (1, 2):     # every row has an entry (null = not verified), for both datasets
        for dataset in ("cremad", "kinetics-sounds"):
            assert set(rp.paper_values(table, dataset)) == {r.name for r in rp.TABLE_ROWS[table]}
    assert "no setting" in rp.unavailable("x", {"no_such_field": 1})
    assert "--modulation 'nope'" in rp.unavailable("x", {"modulation": "nope"})


def test_reproduce_table_2_end_to_end(shards, tmp_path):
    out = tmp_path / "t2"
    events = []
    res = rp.reproduce(2, str(shards), out, seeds=[0, 1], overrides=TINY, on_event=events.append)
    ran = [r["name"] for r in res.rows]
    # every row whose method this build has ran; the others are named with the reason
    expected = [r.name for r in rp.TABLE_ROWS[2] if rp.unavailable(r.name, {**r.settings, **TINY}) is None]
    assert ran == expected and {"concat", "ogm", "ogm-ge"} <= set(ran)
    assert set(res.skipped) == {r.name for r in rp.TABLE_ROWS[2]} - set(ran)
    assert [e["row"] for e in events if e["event"] == "skip"] == list(res.skipped)
    runs = [(e["row"], e["seed"]) for e in events if e["event"] == "run"]
    assert runs == [(r, s) for r in ran for s in (0, 1)]
    cfg = json.loads((out / "runs" / "ogm-ge" / "seed-1" / "config.json").read_text())
    # the paper's CREMA-D preset (alpha 0.8, SGD, lr step 70), then the overrides
    assert (cfg["alpha"], cfg["optimizer"], cfg["lr_step"], cfg["epochs"], cfg["seed"]) == (0.8, "sgd", 70, 1, 1)
    assert cfg["shards"] == str(shards)

    numbers = json.loads(res.numbers.read_text())
    assert numbers["dataset"] == "cremad" and numbers["preset"] == "paper-cremad"
    by = {r["name"]: r for r in numbers["rows"]}
    summaries = [json.loads((out / "runs" / "ogm" / f"seed-{s}" / "summary.json").read_text()) for s in (0, 1)]
    base = [json.loads((out / "runs" / "concat" / f"seed-{s}" / "summary.json").read_text()) for s in (0, 1)]
    diffs = [a["test"]["acc"] - b["test"]["acc"] for a, b in zip(summaries, base)]
    assert by["ogm"]["vs"]["row"] == "concat" and by["ogm"]["vs"]["n"] == 2
    assert by["ogm"]["vs"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert by["ogm"]["acc"][0] == pytest.approx(sum(s["test"]["acc"] for s in summaries) / 2)
    assert "vs" not in by["concat"]

    md = res.report.read_text()
    assert "## Against the paper" in md and "| acc (ours) | acc (paper) |" in md
    against = md[md.index("## Against the paper"):]
    line = next(ln for ln in against.splitlines() if ln.startswith("| ogm |"))
    assert "| ? |" in line and "vs `concat`" in line            # unverified paper value shown as ?
    for name in res.skipped:
        assert name in md
    # re-running keeps every finished seed
    stamp = (out / "runs" / "concat" / "seed-0" / "last.pt").stat().st_mtime_ns
    again = []
    rp.reproduce(2, str(shards), out, seeds=[0, 1], overrides=TINY, on_event=again.append)
    assert (out / "runs" / "concat" / "seed-0" / "last.pt").stat().st_mtime_ns == stamp
    assert not [e for e in again if e["event"] == "start"]       # no training started


def test_reproduce_refuses_before_training(shards, tmp_path):
    out = tmp_path / "fail"
    missing = [r.name for r in rp.TABLE_ROWS[2] if rp.unavailable(r.name, r.settings)]
    if missing:
        with pytest.raises(ConfigError, match="rows this build cannot run: " + missing[0]):
            rp.reproduce(2, str(shards), out, seeds=[0], overrides=TINY, missing="fail")
        assert not out.exists()
    with pytest.raises(ConfigError, match="--table must be one of 1, 2"):
        rp.reproduce(3, str(shards), out, seeds=[0])
    with pytest.raises(ConfigError, match="no setting"):
        rp.reproduce(2, str(shards), out, seeds=[0], overrides={"bogus": 1})


def test_every_row_of_both_tables_runs_in_this_build():
    for table in (1, 2):
        assert [r.name for r in rp.TABLE_ROWS[table] if rp.unavailable(r.name, {**r.settings, **TINY})] == []


def test_reproduce_command_runs_the_table_and_reports_it(shards, tmp_path):
    from click.testing import CliRunner

    from cli.train_cli import main

    out = tmp_path / "cli-t2"
    args = ["reproduce", "--table", "2", "--shards", str(shards), "--out", str(out), "--seeds", "0",
            "--epochs", "1", "--batch-size", "8", "--image-size", "24", "--arch", "small", "--workers", "0",
            "--device", "cpu"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    numbers = json.loads((out / "reproduce.json").read_text())
    assert [r["name"] for r in numbers["rows"]] == [r.name for r in rp.TABLE_ROWS[2]]
    assert numbers["skipped"] == {} and numbers["seeds"] == [0]
    cfg = json.loads((out / "runs" / "modality-drop-visual" / "seed-0" / "config.json").read_text())
    assert (cfg["modulation"], cfg["drop_modality"], cfg["epochs"], cfg["arch"]) == ("modality-drop", "visual", 1,
                                                                                     "small")
    report = (out / "report.md").read_text()
    assert "Against the paper" in report and "56.8" in report       # Gradient-Blending's CREMA-D value
    last = out / "runs" / "ogm" / "seed-0" / "last.pt"
    before = last.stat().st_mtime_ns
    again = CliRunner().invoke(main, args)                            # finished seeds are kept
    assert again.exit_code == 0, again.output
    assert last.stat().st_mtime_ns == before
