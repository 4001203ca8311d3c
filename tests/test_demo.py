"""The demo: split sizes, precondition and verdict from the numbers (paired, 95% t-interval),
the README's copy of its results, and the real demo end to end twice (the second run resumes)."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from ogmge_train import demo, report
from ogmge_train.demo import DEMO
from ogmge_train.report import RunRecord

README = Path(__file__).resolve().parents[1] / "README.md"


def _run(seed: int, acc: float, probe_v: float | None = None, acc_v: float | None = None) -> RunRecord:
    probes = {} if probe_v is None else {"visual": {"test": {"acc": probe_v}}}
    return RunRecord(Path(f"x/seed-{seed}"), {"seed": seed}, [], [],
                     {"selected_epoch": 3, "val": {}, "test": {"acc": acc, "acc_v": acc_v}}, probes)


def test_t_quantile_matches_scipy():
    from scipy import stats

    for df in range(1, 31):
        assert report.t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-4)
    for df in (31, 40, 60, 200):
        assert report.t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-3)


def test_paired_difference_is_a_t_interval_over_seeds():
    from scipy import stats

    base = {0: 0.50, 1: 0.52, 2: 0.47, 3: 0.55, 4: 0.49, 9: 0.1}
    treated = {0: 0.56, 1: 0.55, 2: 0.52, 3: 0.56, 4: 0.57}
    d = report.paired_difference(base, treated)
    diffs = [treated[s] - base[s] for s in range(5)]
    lo, hi = stats.t.interval(0.95, 4, loc=sum(diffs) / 5, scale=stats.sem(diffs))
    assert d["n"] == 5 and d["seeds"] == [0, 1, 2, 3, 4] and (d["up"], d["down"]) == (5, 0)
    assert d["mean"] == pytest.approx(sum(diffs) / 5)
    assert d["ci"] == pytest.approx((lo, hi), abs=1e-6)
    one = report.paired_difference({0: 0.5}, {0: 0.6})
    assert one["ci"] is None and one["mean"] == pytest.approx(0.1)
    assert report.paired_difference({0: 0.5}, {1: 0.6})["n"] == 0


def test_split_counts_are_exact_and_deterministic():
    n = demo.split_counts(DEMO)
    assert sum(n.values()) == DEMO.clips and n["test"] > 200          # one clip < 0.5 points
    names = [f"{1001 + i}_DFA_ANG_XX" for i in range(DEMO.clips)]
    split = demo.assign_splits(names, DEMO)
    assert {s: list(split.values()).count(s) for s in ("train", "val", "test")} == n
    assert demo.assign_splits(list(reversed(names)), DEMO) == split    # order of listing is irrelevant
    assert len(DEMO.seeds) >= 5


def test_precondition_and_verdict_state_what_they_find():
    seeds = range(5)
    visual_only = [_run(s, 0.70 + 0.01 * s) for s in seeds]
    concat = [_run(s, 0.95, probe_v=0.40, acc_v=0.50 + 0.01 * s) for s in seeds]
    ogm = [_run(s, 0.95 - 0.001 * s, probe_v=0.48 + 0.01 * (s % 2), acc_v=0.55) for s in seeds]
    groups = {"visual-only": visual_only, "concat": concat, "concat+ogm-ge": ogm}
    pre = demo.precondition(groups)
    assert pre["holds"] and pre["gap"] == pytest.approx(0.20) and pre["n"] == 5
    text = demo.conclusion(groups)
    assert "a gap of 20.0 points" in text and "**holds**." in text and pre["established"]
    probe = next(ln for ln in text.splitlines() if "visual linear-probe" in ln)
    assert probe.startswith("- `concat+ogm-ge` **raised**") and "+8.4 points (95% CI" in probe
    assert "higher in 5 and lower in 0 of 5 seeds" in probe
    fused = next(ln for ln in text.splitlines() if "fused test accuracy" in ln)
    assert "**lowered**" in fused or "**did not detectably change**" in fused
    # the premise fails: the report says so instead of reading the comparison as evidence
    weak = {**groups, "visual-only": [_run(s, 0.52) for s in seeds]}
    text = demo.conclusion(weak)
    assert "**does not hold**" in text and "does not test what the demo is built to show" in text
    # the mean clears 10 points but the interval does not: said so
    noisy = {**groups, "visual-only": [_run(s, v) for s, v in zip(seeds, (0.9, 0.55, 0.8, 0.52, 0.7))]}
    text = demo.conclusion(noisy)
    assert "**holds** on the mean, but its 95% interval reaches below 10 points" in text
    # one seed: no interval and no "± 0.0"
    single = {k: v[:1] for k, v in groups.items()}
    text = demo.conclusion(single)
    assert "one seed, no interval" in text and "± 0.0" not in text


def test_demo_settings_live_in_one_place():
    import cli.demo

    source = Path(cli.demo.__file__).read_text()
    assert not re.search(r"snr\W+[-0-9]", source.replace("cfg.audio_snr", "").replace("cfg.visual_snr", ""))
    # the library holds settings, not CLI flag strings
    assert "--" not in "".join(json.dumps(a.settings) for a in DEMO.arms)
    assert DEMO.audio_snr > DEMO.visual_snr
    assert {a.name for a in DEMO.arms} >= {DEMO.baseline, DEMO.treated, DEMO.visual_only}
    assert all(demo.arm_problem(a) is None for a in DEMO.arms)       # make demo's arms all exist


def _table_layout(block: str) -> list[list[str]]:
    lines = [ln for ln in block.splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in ln.strip("|").split("|")][:2] for ln in lines]


def test_readme_results_block_matches_the_demo_settings():
    """The README's block is generated (`python -m cli.demo --update-readme README.md`); its
    deterministic parts must be what the current DEMO produces: the setup paragraph (clips,
    SNRs, split sizes, one clip in points, arms, epochs, seeds) and the table's layout (header,
    run labels, seed counts). Accuracies are not compared: they vary across torch builds."""
    block = demo.readme_section(README.read_text())
    assert block is not None, "README.md lacks the demo results markers"
    assert demo.setup_markdown(DEMO) in block, "README demo block is stale: rerun the demo with --update-readme"
    layout = _table_layout(block)
    assert layout[0] == ["run", "seeds"]
    assert layout[1:] == [[a.name, str(len(DEMO.seeds))] for a in DEMO.arms]
    # headings nest under the README's "Results of the demo"
    assert "\n#### Precondition\n" in block and "\n## Precondition" not in block


def test_update_readme_replaces_only_the_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{demo.README_BEGIN}\nold\n{demo.README_END}\n\nrest\n")
    demo.update_readme(readme, f"{demo.README_BEGIN}\nnew\n{demo.README_END}\n")
    assert readme.read_text() == f"intro\n\n{demo.README_BEGIN}\nnew\n{demo.README_END}\n\nrest\n"


def test_tiny_demo_end_to_end_twice(tmp_path):
    """Every step of the real demo on 60 clips, 1 epoch, 2 seeds; then the same command again
    resumes: it keeps the dataset, shards, trainings and probes and says so."""
    from click.testing import CliRunner

    from cli.demo import main

    out = tmp_path / "demo"
    args = ["--out", str(out), "--clips", "60", "--epochs", "1", "--seeds", "0,1"]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    md = (out / "report.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| run")]
    assert [r.split("|")[1].strip() for r in rows] == [a.name for a in DEMO.arms]
    assert all(r.split("|")[2].strip() == "2" for r in rows)          # two seeds each
    assert "## Precondition" in md and "## Verdict" in md and "visual linear-probe accuracy" in md
    small = dataclasses.replace(DEMO, clips=60, epochs=1, seeds=(0, 1))
    n_test = demo.split_counts(small)["test"]
    assert f"The test split has {n_test} clips: one clip is {100 / n_test:.2f} points" in md
    assert "8 trainings to go; the ETA follows the first" in res.output
    assert "ETA: ~" in res.output                                       # once one training finished
    for png in ("accuracy.png", "rho.png", "loss.png", "precondition.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    manifest = json.loads((out / "shards" / "test.manifest.json").read_text())
    assert manifest["num_samples"] == n_test
    assert (out / "runs" / "concat+ogm-ge" / "seed-1" / "probe_visual.json").is_file()
    assert (out / "runs" / "audio-only" / "seed-0" / "probe_audio.json").is_file()
    assert not (out / "runs" / "audio-only" / "seed-0" / "probe_visual.json").exists()
    block = (out / "readme-block.md").read_text()
    assert demo.setup_markdown(small) in block
    assert _table_layout(block)[1:] == [[a.name, "2"] for a in DEMO.arms]

    ckpt = out / "runs" / "concat" / "seed-0" / "last.pt"
    probe = out / "runs" / "concat" / "seed-0" / "probe_visual.json"
    stamps = (ckpt.stat().st_mtime_ns, probe.stat().st_mtime_ns)
    again = CliRunner().invoke(main, args, catch_exceptions=False)
    assert again.exit_code == 0, again.output
    said = " ".join(again.output.split())          # rich wraps long lines at the terminal width
    assert "kept from an earlier run: raw dataset (60 clips), extracted shards, 8 of 8 trainings, " \
           "8 probed runs" in said, again.output
    assert (ckpt.stat().st_mtime_ns, probe.stat().st_mtime_ns) == stamps
    assert "train concat" not in again.output                 # no training ran
    assert _table_layout((out / "readme-block.md").read_text()) == _table_layout(block)


def test_tiny_compare_end_to_end(tmp_path):
    """`make compare` on tiny settings: every method this build has, per-method plots, the
    precondition figure; methods this build lacks are named, not silently dropped."""
    from click.testing import CliRunner

    from cli.demo import main
    from ogmge_train.demo import COMPARE

    out = tmp_path / "cmp"
    res = CliRunner().invoke(main, ["--compare", "--out", str(out), "--clips", "36", "--epochs", "1",
                                    "--seeds", "0"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    runnable = [a.name for a in COMPARE.arms if demo.arm_problem(a) is None]
    missing = [a.name for a in COMPARE.arms if demo.arm_problem(a) is not None]
    md = (out / "report.md").read_text()
    rows = [ln.split("|")[1].strip() for ln in md.splitlines()
            if ln.startswith("| ") and not ln.startswith("| run")]
    assert rows == runnable and "concat+ogm" in runnable
    said = " ".join(res.output.split())
    for name in missing:
        assert f"skipped {name}:" in said and name in md
    assert "± 0.0" not in md                                  # one seed: no spread shown
    for arm in runnable:
        if arm not in ("concat", "audio-only", "visual-only"):
            for png in ("accuracy.png", "rho.png"):
                assert (out / "methods" / arm / png).read_bytes()[:4] == b"\x89PNG"
    assert (out / "precondition.png").read_bytes()[:4] == b"\x89PNG"
