"""The demo: its verdict is generated from the numbers, and a tiny configuration runs end to end."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ogmge_train.demo import DEMO, conclusion, verdict
from ogmge_train.report import RunRecord


def _run(seed: int, acc: float, probe_v: float | None) -> RunRecord:
    probes = {} if probe_v is None else {"visual": {"test": {"acc": probe_v}}}
    return RunRecord(Path(f"x/seed-{seed}"), {"seed": seed}, [], [],
                     {"selected_epoch": 3, "val": {}, "test": {"acc": acc}}, probes)


def test_verdict_pairs_seeds_and_needs_a_majority():
    base = [_run(s, 0.5, 0.30) for s in range(3)]
    up = [_run(0, 0.6, 0.40), _run(1, 0.55, 0.35), _run(2, 0.52, 0.31)]
    v = verdict(base, up, "acc")
    assert v["direction"] == "raised" and (v["up"], v["down"], v["seeds"]) == (3, 0, 3)
    assert v["delta"] == pytest.approx((0.6 + 0.55 + 0.52) / 3 - 0.5)
    assert verdict(up, base, "probe_v")["direction"] == "lowered"
    # the mean rises, but only one seed of three does: no claim
    mixed = [_run(0, 0.9, None), _run(1, 0.45, None), _run(2, 0.49, None)]
    assert verdict(base, mixed, "acc")["direction"] == "did not consistently change"
    # seeds are paired by the config's seed, not by list order
    assert verdict(base, list(reversed(up)), "acc")["up"] == 3
    assert verdict(base, [_run(7, 0.9, None)], "acc")["direction"] == "could not be compared"


def test_conclusion_states_the_numbers():
    base = [_run(s, 0.5, 0.30 + 0.01 * s) for s in range(3)]
    treated = [_run(s, 0.5 - 0.01 * (s + 1), 0.40 + 0.01 * s) for s in range(3)]
    text = conclusion({DEMO.baseline: base, DEMO.treated: treated})
    probe_line = next(ln for ln in text.splitlines() if "visual linear-probe" in ln)
    assert "**raised**" in probe_line and "41.0 ± 1.0% with OGM-GE vs 31.0 ± 1.0% without" in probe_line
    assert "+10.0 points" in probe_line and "higher in 3 and lower in 0 of 3" in probe_line
    fused = next(ln for ln in text.splitlines() if "fused test accuracy" in ln)
    assert "**lowered**" in fused and "-2.0 points" in fused
    assert "could not be compared" in next(ln for ln in text.splitlines() if "audio linear-probe" in ln)


def test_demo_defaults_live_in_one_place():
    import cli.demo
    source = Path(cli.demo.__file__).read_text()
    # the CLI takes its numbers from DEMO; no SNR or seed literal of its own
    assert not re.search(r"snr\W+[-0-9]", source.replace("cfg.audio_snr", "").replace("cfg.visual_snr", ""))
    assert DEMO.audio_snr > DEMO.visual_snr and len(DEMO.seeds) >= 3
    assert {a.name for a in DEMO.arms} >= {DEMO.baseline, DEMO.treated}


def test_tiny_demo_end_to_end(tmp_path):
    """~25 s of CPU: every step of the real demo, on 60 clips, 1 epoch, 2 seeds."""
    from click.testing import CliRunner

    from cli.demo import main

    out = tmp_path / "demo"
    res = CliRunner().invoke(main, ["--out", str(out), "--clips", "60", "--epochs", "1", "--seeds", "0,1"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    md = (out / "report.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| run")]
    assert [r.split("|")[1].strip() for r in rows] == [a.name for a in DEMO.arms]
    assert all(r.split("|")[2].strip() == "2" for r in rows)          # two seeds each
    assert "## Verdict" in md and "visual linear-probe accuracy" in md
    for png in ("accuracy.png", "rho.png", "loss.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # probes of every encoder each run has
    assert (out / "runs" / "concat+ogm-ge" / "seed-1" / "probe_visual.json").is_file()
    assert (out / "runs" / "audio-only" / "seed-0" / "probe_audio.json").is_file()
    assert not (out / "runs" / "audio-only" / "seed-0" / "probe_visual.json").exists()
    summary = json.loads((out / "runs" / "visual-only" / "seed-0" / "summary.json").read_text())
    assert summary["epochs"] == 1
