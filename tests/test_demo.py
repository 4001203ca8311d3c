"""The demo: its settings (SGD, power, arms from the method registry), the protocol, the
precondition and verdict generated from the numbers (paired, sign-flip, Holm, TOST), the
mechanism summary, the README's copy of its results, and the real demo end to end twice (the
second run resumes)."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from ogmge_train import demo, names, stats
from ogmge_train.demo import COMPARE, DEMO, QUICK
from ogmge_train.report import RunRecord

README = Path(__file__).resolve().parents[1] / "README.md"
LAST = DEMO.epochs - 1


def _run(seed: int, acc: float, *, acc_v: float | None = None, probe_v: float | None = None,
         probe_a: float | None = None, which: str = "last", epochs: int = DEMO.epochs,
         extra: dict | None = None) -> RunRecord:
    """A run whose last epoch (only) is evaluated on test, as the demo's runs are."""
    metrics = [{"epoch": e, "train": {"acc": 0.5}, "rho_a": 2.0, "k_a": 0.1 if e <= 7 else 1.0, "k_v": 1.0,
                **(extra or {})} for e in range(epochs)]
    metrics[-1]["test"] = {"acc": acc, "acc_v": acc_v}
    probes = {m: {"which": which, "checkpoint_epoch": epochs - 1, "test": {"acc": v}}
              for m, v in (("visual", probe_v), ("audio", probe_a)) if v is not None}
    return RunRecord(Path(f"x/seed-{seed}"), {"seed": seed}, metrics, [], None, probes)


def _groups(n=10, *, treated_gain=0.03, noise=0.004, visual_only=0.55, branch=0.38, control=-0.06):
    """Fabricated arms over n seeds: concat fuses to ~0.72; the reference (audio 0.72, visual
    ``visual_only``, p = 0.7) is ~0.84: 11 points of headroom."""
    wiggle = [noise * ((-1) ** s) * (1 + s % 3) for s in range(n)]
    g = {
        "audio-only": [_run(s, 0.72, probe_a=0.7) for s in range(n)],
        "visual-only": [_run(s, visual_only + 0.002 * s, acc_v=visual_only, probe_v=0.6) for s in range(n)],
        "concat": [_run(s, 0.72 + 0.001 * s, acc_v=branch, probe_v=0.5, probe_a=0.7) for s in range(n)],
        "concat+ogm-ge": [_run(s, 0.72 + 0.001 * s + treated_gain + wiggle[s], acc_v=branch + 0.05, probe_v=0.55,
                               probe_a=0.69) for s in range(n)],
        "concat+ogm": [_run(s, 0.72 + 0.001 * s + treated_gain + 0.5 * wiggle[s], acc_v=branch + 0.04,
                            probe_v=0.54, probe_a=0.69) for s in range(n)],
        "control-ogm-strong": [_run(s, 0.72 + 0.001 * s + control + wiggle[s], acc_v=branch + 0.1, probe_v=0.58,
                                    probe_a=0.6) for s in range(n)],
    }
    return g


# ----------------------------------------------------------------------------- settings

def test_split_counts_are_exact_powered_and_deterministic():
    n = demo.split_counts(DEMO)
    assert sum(n.values()) == DEMO.clips
    assert n["test"] >= 2048 and 100 / n["test"] < 0.05          # one test clip < 0.05 points
    assert n["val"] >= 500                                       # enough to select on
    assert len(DEMO.seeds) >= 10 and COMPARE.seeds == DEMO.seeds
    names_ = [f"{1001 + i % 91}_{i // 91:03d}_ANG_XX" for i in range(DEMO.clips)]
    split = demo.assign_splits(names_, DEMO)
    assert {s: list(split.values()).count(s) for s in ("train", "val", "test")} == n
    assert demo.assign_splits(list(reversed(names_)), DEMO) == split    # order of listing is irrelevant


def test_demo_and_compare_train_with_sgd_momentum_and_weight_decay():
    """The paper's optimiser: SGD, momentum 0.9, weight decay 1e-4, for every arm of the demo, the
    quick demo and compare (Adam stays available for Table 6)."""
    import torch

    from ogmge_train.config import resolve
    from ogmge_train.train import _optimizer

    for cfg in (DEMO, QUICK, COMPARE):
        assert cfg.preset == "demo"
        for arm in cfg.arms:
            settings = demo.arm_settings(cfg, arm)
            assert "optimizer" not in settings and "weight_decay" not in settings and "lr" not in settings
            run = resolve(cfg.preset, shards="s", out="o", **settings)
            assert run.optimizer == "sgd" and run.weight_decay == 1e-4
            # every arm: the same budget, evaluated once after its last epoch (last-epoch endpoint)
            assert run.epochs == cfg.epochs and run.eval_every == cfg.epochs
            # the paper's step decay: x0.1 after 2/3 of the epochs (epoch 70 of 100 there)
            assert (run.lr_step, run.lr_gamma) == (round(2 * cfg.epochs / 3), 0.1)
    opt = _optimizer(resolve("demo", shards="s", out="o"), [torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["weight_decay"] == 1e-4
    assert "adam" in names.OPTIMIZERS


def test_compare_arms_come_from_the_method_registry(monkeypatch):
    methods = {a.settings.get("modulation") for a in COMPARE.arms}
    assert set(names.METHODS) <= methods
    assert len({a.name for a in COMPARE.arms}) == len(COMPARE.arms)
    assert [a.name for a in COMPARE.arms[:len(DEMO.arms)]] == [a.name for a in DEMO.arms]
    assert {"concat+modality-drop-audio", "concat+modality-drop-visual"} <= {a.name for a in COMPARE.arms}
    # a method added to the registry gets its arm without a hand-kept list
    monkeypatch.setattr(names, "METHODS", (*names.METHODS, "brand-new"))
    assert "concat+brand-new" in [a.name for a in demo.method_arms()]
    # every compare arm this build has runs with the same protocol
    assert all(demo.arm_problem(a) is None for a in COMPARE.arms)


def test_compare_keeps_every_seed_for_the_verdict_arms_and_fewer_for_the_other_methods():
    seeds = {a.name: demo.arm_seeds(COMPARE, a) for a in COMPARE.arms}
    verdict = demo.verdict_arms(COMPARE)
    assert verdict == {a.name for a in DEMO.arms}
    assert all(seeds[n] == DEMO.seeds for n in verdict)
    assert all(seeds[n] == DEMO.seeds[:COMPARE.method_seeds] for n in seeds if n not in verdict)
    assert COMPARE.method_seeds == 5 and all(demo.arm_seeds(DEMO, a) == DEMO.seeds for a in DEMO.arms)
    assert "(the other methods: 0–4)" in demo.setup_markdown(COMPARE)
    assert "5 for the methods outside the demo's verdict" in demo.protocol_markdown(COMPARE)


def test_umt_learns_from_the_demo_own_unimodal_runs_of_the_same_seed(tmp_path):
    (umt,) = [a for a in COMPARE.arms if a.settings.get("modulation") == "umt"]
    assert dict(umt.teachers) == {"umt_teacher_audio": DEMO.audio_only, "umt_teacher_visual": DEMO.visual_only}
    settings = demo.arm_settings(COMPARE, umt, tmp_path, 3)
    assert settings["umt_teacher_audio"] == str(tmp_path / DEMO.audio_only / "seed-3")
    assert settings["umt_teacher_visual"] == str(tmp_path / DEMO.visual_only / "seed-3")
    assert "umt_teacher_audio" not in demo.arm_settings(COMPARE, umt)
    assert all(not a.teachers for a in COMPARE.arms if a is not umt)


def test_an_arm_with_teachers_starts_only_after_its_teachers_arms_finish(tmp_path, monkeypatch):
    """`_train_all` with two lanes: the UMT arm is planned first (most costly) but waits until both
    unimodal arms, whose runs it distils, have finished; meanwhile another arm takes the free lane."""
    import cli.demo as cli_demo

    events: list[tuple[str, str]] = []
    polls = {"visual-only": 8}                 # visual-only ends last; every other job after 3 polls

    class Proc:
        def __init__(self, job):
            self.job, self.polls = job, 0

        def poll(self):
            self.polls += 1
            n = polls.get(self.job.arm.name, 3)
            if self.polls < n:
                return None
            if self.polls == n:
                events.append(("end", self.job.arm.name))
            return 0

    def start(job, threads):
        job.commands.pop(0)
        job.proc = Proc(job)
        events.append(("start", job.arm.name))

    monkeypatch.setattr(cli_demo, "_start", start)
    monkeypatch.setattr(cli_demo, "_POLL_S", 0.0)
    monkeypatch.setattr(cli_demo, "_finished_runs", lambda cfg, runs: 0)
    arms = {a.name: a for a in COMPARE.arms}
    umt = arms["concat+umt"]
    assert {t for _, t in umt.teachers} == {"audio-only", "visual-only"}
    jobs = [cli_demo._Job(arms[name], [["sweep"]], 1, cost, tmp_path / f"{name}.log",
                          after={t for _, t in arms[name].teachers})
            for name, cost in (("concat+umt", 9.0), ("audio-only", 2.0), ("visual-only", 2.0), ("concat", 1.0))]
    cli_demo._train_all(COMPARE, jobs, tmp_path, lanes=2, threads=1)
    assert events == [("start", "audio-only"), ("start", "visual-only"), ("end", "audio-only"),
                      ("start", "concat"), ("end", "concat"), ("end", "visual-only"), ("start", "concat+umt"),
                      ("end", "concat+umt")]


def test_setting_changes_name_what_differs_and_ignore_place_and_new_fields():
    stored = {"lr": 0.01, "epochs": 15, "eval_splits": ["val", "test"], "out": "a/seed-0", "shards": "/x",
              "workers": 0, "gone": 1}
    wanted = {"lr": 0.03, "epochs": 15, "eval_splits": ("val", "test"), "out": "b/seed-0", "shards": "/y",
              "workers": 2, "new_field": 3, "alpha": None, "dataset": ""}
    stored.update(alpha=0.8, dataset="cremad")       # filled from the dataset at training time
    assert demo.setting_changes(stored, wanted) == {"lr": (0.01, 0.03)}
    assert demo.setting_changes(stored, {**wanted, "lr": 0.01}) == {}


def test_planned_contrasts_primary_first_then_control_and_ogm_ge_vs_ogm():
    assert demo.contrasts(DEMO) == [("concat+ogm-ge", "concat"), ("concat+ogm", "concat"),
                                    ("control-ogm-strong", "concat"), ("concat+ogm-ge", "concat+ogm")]
    planned = demo.contrasts(COMPARE)
    assert planned[0] == ("concat+ogm-ge", "concat") and planned[-1] == ("concat+ogm-ge", "concat+ogm")
    assert planned[-2] == ("control-ogm-strong", "concat")
    assert {t for t, _ in planned} == {a.name for a in COMPARE.arms if a.multimodal} - {"concat"}
    # an arm that did not run leaves its contrasts out
    assert demo.contrasts(DEMO, ["concat", "concat+ogm-ge"]) == [("concat+ogm-ge", "concat")]


def test_the_control_modulates_every_epoch_and_the_others_the_first_half():
    window = {a.name: demo.arm_settings(DEMO, a)["modulation_end"] for a in DEMO.arms}
    assert window["control-ogm-strong"] == DEMO.epochs - 1
    assert window["concat+ogm-ge"] == demo.modulation_end(DEMO) == DEMO.epochs // 2


def test_demo_settings_live_in_one_place():
    import cli.demo

    source = Path(cli.demo.__file__).read_text()
    assert not re.search(r"snr\W+[-0-9]", source.replace("cfg.audio_snr", "").replace("cfg.visual_snr", ""))
    # the library holds settings, not CLI flag strings
    assert "--" not in "".join(json.dumps(a.settings) for a in COMPARE.arms)
    assert DEMO.audio_snr > DEMO.visual_snr and 0 < DEMO.audio_cue_fraction < 1
    assert {a.name for a in DEMO.arms} >= {DEMO.baseline, DEMO.treated, DEMO.visual_only, DEMO.audio_only,
                                           DEMO.ogm, DEMO.control}
    assert all(demo.arm_problem(a) is None for a in DEMO.arms)       # make demo's arms all exist


# ----------------------------------------------------------------------------- findings

def test_reference_uses_audio_on_toned_clips_and_vision_elsewhere():
    g = _groups()
    ref = demo.reference_accuracy(g)
    p, k = DEMO.audio_cue_fraction, DEMO.num_classes
    assert ref[3] == pytest.approx(0.72 + (1 - p) * (0.55 + 0.006 - 1 / k))
    assert sorted(ref) == list(range(10))


def test_probes_of_a_selected_checkpoint_do_not_count():
    run = _run(0, 0.7, probe_v=0.5)
    assert demo._values({"a": [run]}, "a", "probe_v") == {0: 0.5}
    best = _run(0, 0.7, probe_v=0.5, which="best")
    assert demo._values({"a": [best]}, "a", "probe_v") == {}
    # a run that stopped early has no last-epoch values at all
    short = RunRecord(Path("x/seed-0"), {"seed": 0}, [{"epoch": 0, "train": {}}], [], None, {})
    assert demo._values({"a": [short]}, "a", "acc") == {}


def test_precondition_and_primary_verdicts_follow_the_numbers():
    g = _groups()
    pre = demo.precondition(g)
    assert pre["gap"]["mean"] == pytest.approx(0.55 + 0.002 * 4.5 - 0.38) and pre["gap"]["established"]
    assert pre["headroom"]["holds"] and pre["holds"]
    res = demo.analyse(g)
    assert res["order"][0] == "concat+ogm-ge − concat"
    prim = res["primary"]["concat+ogm-ge − concat"]
    assert prim["n"] == 10 and prim["p"] == pytest.approx(2 / 1024)       # every seed up: exact sign-flip p
    # Holm over the four planned contrasts, against the module's holm (checked in test_stats)
    raw = {k: d["p"] for k, d in res["primary"].items()}
    assert {k: d["p_holm"] for k, d in res["primary"].items()} == pytest.approx(stats.holm(raw))
    assert prim["mde"] == pytest.approx(stats.minimal_detectable_effect(prim["sd"], 10))
    text = demo.conclusion(g)
    line = next(ln for ln in text.splitlines() if ln.startswith("- `concat+ogm-ge` vs `concat`"))
    assert "**raised** the fused accuracy" in line and "sign-flip p = 0.002" in line and "95% CI +" in line
    assert f"Holm p = {prim['p_holm']:.3f}" in line
    assert "Positive control: `control-ogm-strong` moved the fused accuracy by -6.0 points" in text
    assert "the endpoint is sensitive" in text
    assert "**met**" in text and "does not hold" not in text
    assert "| concat+ogm-ge − concat | 10 | +3.0 |" in text


def test_null_results_are_equivalence_only_with_tost_else_inconclusive():
    tight = demo.conclusion(_groups(treated_gain=0.0, noise=0.002))
    line = next(ln for ln in tight.splitlines() if ln.startswith("- `concat+ogm-ge` vs `concat`"))
    assert "**no effect larger than 2 points** (TOST p = " in line
    noisy = demo.conclusion(_groups(treated_gain=0.0, noise=0.03))
    line = next(ln for ln in noisy.splitlines() if ln.startswith("- `concat+ogm-ge` vs `concat`"))
    assert "**inconclusive**" in line and "effects up to" in line and "raised" not in line
    # a control that does not move: the report says the null results are uninformative
    dull = demo.conclusion(_groups(treated_gain=0.0, noise=0.03, control=0.0))
    assert "**not detected**, so the endpoint may be insensitive" in dull


def test_a_clear_effect_on_too_few_seeds_is_called_untestable_not_absent():
    """Five seeds, all higher: the exact sign-flip p is 2/32 whatever the size, so the verdict
    says the contrast cannot be tested and which side of 0 its interval lies, not "no effect"."""
    text = demo.conclusion(_groups(n=5, treated_gain=0.05))
    line = next(ln for ln in text.splitlines() if ln.startswith("- `concat+ogm-ge` vs `concat`"))
    assert "higher in 5, lower in 0 of 5 seeds" in line and "sign-flip p = 0.062" in line
    assert "**not testable with 5 seeds** (the exact sign-flip p cannot go below 0.0625 > 0.05)" in line
    assert "its 95% interval lies above 0" in line and "inconclusive" not in line and "no effect" not in line
    # with ten seeds the same effect is tested, and detected
    assert "**raised**" in demo.conclusion(_groups(n=10, treated_gain=0.05))


def test_a_failed_premise_is_said_before_any_contrast():
    text = demo.conclusion(_groups(visual_only=0.40))
    assert "**not met**" in text and "The premise **does not hold**" in text
    assert text.index("does not hold") < text.index("## Primary endpoint")


def test_mechanism_summarises_k_and_update_norms_or_says_they_were_not_recorded():
    g = _groups()
    mech = demo.mechanism(g)
    assert not mech["recorded"] and mech["summary"]["concat+ogm-ge"]["k_a"] == pytest.approx(0.1)
    assert "**not recorded**" in demo.conclusion(g)
    norms = {name: [_run(s, 0.7, extra={"update_norm_a": 0.5 if name != "concat" else 2.0,
                                        "update_norm_v": 1.0}) for s in range(3)] for name in g}
    mech = demo.mechanism(norms)
    assert mech["recorded"] and mech["summary"]["concat+ogm-ge"]["update_norm_a"] == pytest.approx(0.25)
    assert mech["summary"]["concat+ogm-ge"]["update_norm_v"] == pytest.approx(1.0)
    text = demo.conclusion(norms)
    assert "audio encoder update 0.25× `concat`'s" in text and "not recorded" not in text


def test_protocol_comes_before_the_numbers_and_names_every_contrast():
    text = demo.protocol_markdown(DEMO)
    for t, b in demo.contrasts(DEMO):
        assert f"`{t}` − `{b}`" in text
    assert "last epoch" in text and "sign-flip" in text and "Holm" in text and "TOST" in text and "MDE" in text


# ----------------------------------------------------------------------------- the README block

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
    runs = [row for row in layout[1:] if row[0] in {a.name for a in DEMO.arms}]
    assert runs == [[a.name, str(len(DEMO.seeds))] for a in DEMO.arms]
    # headings nest under the README's "Results of the demo"
    assert "\n#### Precondition\n" in block and "\n## Precondition" not in block


def test_update_readme_replaces_only_the_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{demo.README_BEGIN}\nold\n{demo.README_END}\n\nrest\n")
    demo.update_readme(readme, f"{demo.README_BEGIN}\nnew\n{demo.README_END}\n")
    assert readme.read_text() == f"intro\n\n{demo.README_BEGIN}\nnew\n{demo.README_END}\n\nrest\n"


# ----------------------------------------------------------------------------- end to end

def test_tiny_demo_end_to_end_twice(tmp_path, monkeypatch):
    """Every step of the real demo (`make demo-quick`'s four arms) on 120 clips, 1 epoch, 2 seeds;
    then the same command again resumes: it keeps the dataset, shards, trainings and probes and
    says so. (The six arms of `make demo` run end to end in the slow compare test.)"""
    from click.testing import CliRunner

    from cli.demo import main

    out = tmp_path / "demo"
    args = ["--quick", "--out", str(out), "--clips", "120", "--epochs", "1", "--seeds", "0,1"]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    md = (out / "report.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith(("| run", "| contrast"))]
    assert [r.split("|")[1].strip() for r in rows[:len(QUICK.arms)]] == [a.name for a in QUICK.arms]
    assert all(r.split("|")[2].strip() == "2" for r in rows[:len(QUICK.arms)])          # two seeds each
    # the design and protocol are stated before the first number
    assert md.index("### Design") < md.index("### Protocol") < md.index("| run |") < md.index("## Precondition")
    for heading in ("## Primary endpoint", "## Secondary endpoints", "## Mechanism"):
        assert heading in md
    small = dataclasses.replace(QUICK, clips=120, epochs=1, seeds=(0, 1))
    n_test = demo.split_counts(small)["test"]
    assert f"The test split has {n_test} clips: one clip is {100 / n_test:.2f} points" in md
    said = " ".join(res.output.split())
    assert "8 trainings to go" in said and "ETA ~" in said
    for png in ("accuracy.png", "rho.png", "loss.png", "precondition.png", "effects.png", "mechanism.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "shards" / "test.manifest.json").read_text())["num_samples"] == n_test
    probe = json.loads((out / "runs" / "concat+ogm-ge" / "seed-1" / "probe_visual.json").read_text())
    assert probe["which"] == "last" and probe["checkpoint_epoch"] == 0
    assert (out / "runs" / "concat" / "seed-0" / "probe_audio.json").is_file()
    # unimodal arms enter only through their test accuracy: no probe is spent on them
    assert not list((out / "runs" / "audio-only" / "seed-0").glob("probe_*.json"))
    cfg = json.loads((out / "runs" / "concat+ogm-ge" / "seed-0" / "config.json").read_text())
    assert (cfg["optimizer"], cfg["eval_every"], cfg["image_size"]) == ("sgd", 1, 32)
    assert (out / "logs" / "concat.log").read_text().startswith("$ ogmge-train sweep")
    block = (out / "readme-block.md").read_text()
    assert demo.setup_markdown(small) in block
    assert _table_layout(block)[1:len(QUICK.arms) + 1] == [[a.name, "2"] for a in QUICK.arms]

    ckpt = out / "runs" / "concat" / "seed-0" / "last.pt"
    probe_file = out / "runs" / "concat" / "seed-0" / "probe_visual.json"
    stamps = (ckpt.stat().st_mtime_ns, probe_file.stat().st_mtime_ns)
    again = CliRunner().invoke(main, args, catch_exceptions=False)
    assert again.exit_code == 0, again.output
    said = " ".join(again.output.split())          # rich wraps long lines at the terminal width
    assert "kept from an earlier run: raw dataset (120 clips), extracted shards, 8 of 8 trainings, " \
           "4 probed runs" in said, again.output
    assert "kept finished runs with the same settings: audio-only seeds 0, 1; visual-only seeds 0, 1; " \
           "concat seeds 0, 1; concat+ogm-ge seeds 0, 1" in said
    assert (ckpt.stat().st_mtime_ns, probe_file.stat().st_mtime_ns) == stamps
    assert "ogmge-train sweep" not in again.output                 # no training ran
    assert _table_layout((out / "readme-block.md").read_text()) == _table_layout(block)

    # other settings: refused before anything is trained or removed
    changed = CliRunner().invoke(main, [*args[:5], "--epochs", "2", *args[-2:]], catch_exceptions=False)
    assert changed.exit_code != 0
    said = " ".join(changed.output.split())
    assert "holds runs trained with other settings (seed-0: epochs 1 → 2" in said, changed.output
    assert "choose another --out" in said and ckpt.stat().st_mtime_ns == stamps[0]

    # a method added later (compare after a new entry in names.METHODS): only its arm trains.
    # UMT's teachers are the demo's own uni-modal runs of the same seed
    (umt,) = [a for a in COMPARE.arms if a.settings.get("modulation") == "umt"]
    monkeypatch.setattr(demo, "QUICK", dataclasses.replace(QUICK, arms=(*QUICK.arms, umt)))
    more = CliRunner().invoke(main, args, catch_exceptions=False)
    assert more.exit_code == 0, more.output
    said = " ".join(more.output.split())
    assert "2 trainings to go in 1 jobs" in said and "8 of 10 trainings" in said
    assert ckpt.stat().st_mtime_ns == stamps[0]
    run = out / "runs" / umt.name / "seed-1"
    assert (run / "probe_visual.json").is_file()
    stored = json.loads((run / "config.json").read_text())
    assert stored["umt_teacher_audio"] == str((out / "runs" / "audio-only" / "seed-1").resolve())
    assert stored["umt_teacher_visual"] == str((out / "runs" / "visual-only" / "seed-1").resolve())


@pytest.mark.slow
def test_tiny_compare_end_to_end(tmp_path):
    """`make compare` on tiny settings: every method this build has, per-method plots, the
    precondition figure; methods this build lacks are named, not silently dropped."""
    from click.testing import CliRunner

    from cli.demo import main

    out = tmp_path / "cmp"
    res = CliRunner().invoke(main, ["--compare", "--out", str(out), "--clips", "120", "--epochs", "1",
                                    "--seeds", "0"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    runnable = [a.name for a in COMPARE.arms if demo.arm_problem(a) is None]
    missing = [a.name for a in COMPARE.arms if demo.arm_problem(a) is not None]
    md = (out / "report.md").read_text()
    rows = [ln.split("|")[1].strip() for ln in md.split("## Precondition")[0].splitlines()
            if ln.startswith("| ") and not ln.startswith("| run")]
    assert rows == runnable and "concat+ogm" in runnable
    said = " ".join(res.output.split())
    for name in missing:
        assert f"skipped {name}:" in said and name in md
    assert "± 0.0" not in md.split("## Precondition")[0]                # one seed: no spread shown
    for arm in runnable:
        if arm not in ("concat", "audio-only", "visual-only"):
            for png in ("accuracy.png", "rho.png"):
                assert (out / "methods" / arm / png).read_bytes()[:4] == b"\x89PNG"
    assert (out / "precondition.png").read_bytes()[:4] == b"\x89PNG"
    # every planned contrast is a row; Holm runs within two families: the verdict's four contrasts
    # and an exploratory one for the other methods (arm names need not start with "concat+")
    planned = demo.contrasts(dataclasses.replace(COMPARE, arms=tuple(a for a in COMPARE.arms if a.name in runnable)))
    table = md.split("## Primary endpoint")[1].split("## Secondary")[0]
    labels = [ln.split("|")[1].strip() for ln in table.splitlines()
              if ln.startswith("| ") and not ln.startswith("| contrast")]
    assert labels == [f"{t} − {b}" for t, b in planned] and "sum+greedy − concat" in labels
    protocol = " ".join(md.split())
    assert "over the 4 planned contrasts of the verdict" in protocol
    assert f"the other methods' {len(planned) - 4} contrasts are an exploratory family" in protocol


def test_make_targets_run_the_three_presets():
    """`make demo`, `make demo-quick` and `make compare` (dry run: the commands only) name the
    presets and output folders the README gives, and the command the user typed for Ctrl-C."""
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("no make")
    root = Path(__file__).resolve().parents[1]
    for target, flags in (("demo", "--out demo-out"), ("demo-quick", "--quick --out demo-quick-out"),
                          ("compare", "--compare --out compare-out")):
        out = subprocess.run(["make", "-n", "-C", str(root), target, "TORCH=torch==2.13.0"], capture_output=True,
                             text=True, check=True).stdout
        assert f'OGMGE_COMMAND="make {target}" .venv/bin/python -m cli.demo {flags}' in out, out


def test_compare_keeps_the_demos_holm_family_and_its_own_readme_block():
    # compare's extra methods must not dilute the verdict's correction: the verdict family is the demo's
    families = demo._families(demo.COMPARE, demo.contrasts(demo.COMPARE))
    assert families["verdict"] == [demo._label(c) for c in demo.contrasts(demo.DEMO)]
    assert len(families["verdict"]) == 4
    assert len(families["exploratory"]) == len(demo.contrasts(demo.COMPARE)) - 4
    text = README.read_text()
    compare_block = demo.readme_section(text, demo.COMPARE)
    assert compare_block is not None and demo.setup_markdown(demo.COMPARE) in compare_block
    assert demo.readme_section(text) != compare_block
