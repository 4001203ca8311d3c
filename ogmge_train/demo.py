"""The demo experiment (``make demo``, ``make demo-quick``, ``make compare``): its design, settings,
pre-registered protocol and statistics in one place, and the findings generated from its numbers.

Design (README: "What `make demo` shows"). A synthetic CREMA-D-layout task built to have the
paper's signature, so that OGM-GE has something to fix and the fix can show in fused accuracy:

- audio: a class tone that is easy (learnt within an epoch) but present on only
  ``audio_cue_fraction`` of the clips; the others' audio is pure noise;
- visual: a class colour under heavy pixel noise on every clip: weak, slow to learn, but a
  visual-only model learns it.

Joint training fits the toned clips through audio at once and then memorises the noise of the
few toneless training clips through audio too, so the training loss reaches ~0 and the visual
encoder stops receiving gradient: it is under-trained (the *precondition*). At test, the fused
prediction on a toneless clip is the visual branch's, so the under-trained visual encoder costs
fused accuracy: there is *headroom* below a model that uses both cues fully. A purely
complementary design (audio names a class group, vision the class within it) has no such
suppression: the within-group loss always reaches vision.

The protocol is fixed before any number is seen (``protocol_markdown``): one primary endpoint,
fused test accuracy at the last epoch (every arm the same number of steps); secondary endpoints
at the last epoch too (visual branch, visual and audio linear probes of last.pt); planned
paired contrasts with an exact sign-flip test, Holm's correction, a TOST equivalence test for
"no effect larger than X", and the minimal detectable effect from the observed paired SD.
Nothing here prints or runs commands: ``cli/demo.py`` runs the real CLI with these settings.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from . import names, runfolder, stats
from .errors import RunFolderError
from .report import RunRecord, format_cell, per_seed

__all__ = ["Arm", "DemoConfig", "DEMO", "QUICK", "COMPARE", "README_BEGIN", "README_END", "ENDPOINTS",
           "PRIMARY", "SECONDARY", "modulation_end", "lr_step", "arm_settings", "arm_seeds", "verdict_arms",
           "setting_changes", "split_counts", "assign_splits",
           "write_split_files", "arm_problem", "reference_accuracy", "precondition", "contrasts",
           "analyse", "mechanism", "design_markdown", "protocol_markdown", "conclusion", "setup_markdown",
           "seeds_text", "readme_markers", "readme_block", "readme_section", "update_readme", "method_arms"]


@dataclass(frozen=True)
class Arm:
    name: str                 # folder name under OUT/runs and row label of the report
    settings: dict            # TrainConfig fields on top of the preset (e.g. {"modulation": "ogm"})
    whole_run: bool = False   # modulate every epoch (default: the demo's modulation window)
    # TrainConfig option -> arm whose run of the same seed it names (UMT's uni-modal teachers);
    # the arm trains after those arms
    teachers: tuple = ()

    @property
    def multimodal(self) -> bool:
        return self.settings.get("modality", "both") == "both"


AUDIO_ONLY = Arm("audio-only", {"modality": "audio", "modulation": "none"})
VISUAL_ONLY = Arm("visual-only", {"modality": "visual", "modulation": "none"})
CONCAT = Arm("concat", {"fusion": "concat", "modulation": "none"})
OGM_GE = Arm("concat+ogm-ge", {"fusion": "concat", "modulation": "ogm-ge"})
OGM = Arm("concat+ogm", {"fusion": "concat", "modulation": "ogm"})
# The positive control: OGM so strong that it must move the endpoint if the endpoint can move
# at all (every epoch, every encoder parameter, alpha = 3: k_a = 1 - tanh(3 rho_a) < 0.01
# whenever audio leads).
CONTROL = Arm("control-ogm-strong", {"fusion": "concat", "modulation": "ogm", "alpha": 3.0,
                                      "modulation_scope": "all"}, whole_run=True)

ENDPOINTS = {"acc": "fused test accuracy", "acc_v": "visual-branch test accuracy",
             "probe_v": "visual linear-probe test accuracy", "probe_a": "audio linear-probe test accuracy"}
PRIMARY = "acc"
SECONDARY = ("acc_v", "probe_v", "probe_a")


@dataclass(frozen=True)
class DemoConfig:
    """Every setting of the demo. SNRs are in dB (see avprep.synth)."""

    clips: int = 3072
    # The demo writes its own split files: test_fraction of the clips (by a hash of the clip
    # name) are test, val_fraction of the rest val: 2048 test clips (one clip = 0.05 points),
    # 512 val, 512 train.
    test_fraction: float = 2 / 3
    val_fraction: float = 0.5
    num_classes: int = 6
    audio_snr: float = -8.0            # the tone: an audio-only model is right on every toned clip
    audio_cue_fraction: float = 0.65   # share of clips with a tone; the rest: noise only
    visual_snr: float = -23.0          # visual-only: far above chance, far from perfect, still learning
    synth_seed: int = 0
    duration: float = 1.0              # seconds per clip (spectrograms are tiled to CREMA-D's 3 s)
    synth_fps: int = 1
    synth_size: str = "48x36"
    # extraction: 32-px frames and a 33x25 STFT keep the CPU encoders fast (the class tones,
    # 250-3500 Hz, still fall in distinct 250-Hz bins)
    frame_size: int = 32
    spec: dict = field(default_factory=lambda: {"n_fft": 64, "win_length": 64, "hop_length": 1920})
    shard_size: int = 256
    extract_workers: int = 2
    # training: the `demo` preset (small CNNs, SGD momentum 0.9, weight decay 1e-4) for every arm,
    # same budget and seeds; evaluated once, after the last epoch (--eval-every = epochs)
    preset: str = "demo"
    epochs: int = 15
    seeds: tuple = tuple(range(10))
    # arms outside the verdict (compare's other methods) train on only the first `method_seeds` of
    # the seeds (None: all); the report states each contrast's seeds and MDE
    method_seeds: int | None = None
    # OGM-GE modulates the first half of the epochs, as the reference code does (epochs 0-50 of 100)
    modulation_fraction: float = 0.5
    # the learning rate drops x0.1 after 2/3 of the epochs, as the paper's does (epoch 70 of 100):
    # at a constant rate the last epoch's heads are noisy (visual-only: SD 6.4 points over seeds)
    lr_decay_fraction: float = 2 / 3
    train: dict = field(default_factory=lambda: {"image_size": 32})   # extra settings for every arm
    probe_steps: int = 100
    jobs: int = 2                      # trainings run side by side, one torch thread each
    arms: tuple = (AUDIO_ONLY, VISUAL_ONLY, CONCAT, OGM_GE, OGM, CONTROL)
    baseline: str = "concat"           # the arm every other multimodal arm is compared with
    treated: str = "concat+ogm-ge"     # the arm the headline verdict is about
    ogm: str = "concat+ogm"            # OGM-GE is also contrasted with OGM directly
    control: str = "control-ogm-strong"
    audio_only: str = "audio-only"
    visual_only: str = "visual-only"
    # pre-registered thresholds (points are fractions here: 0.15 = 15 points)
    precondition_gap: float = 0.15     # visual branch of concat below visual-only, at least
    headroom: float = 0.10             # concat's fused accuracy below the reference, at least
    equivalence_margin: float = 0.02   # "no effect larger than 2 points" needs TOST at this margin
    level: float = 0.05                # two-sided, family-wise over the planned contrasts (Holm)
    power: float = 0.8                 # of the minimal detectable effect
    label: str = "make demo"
    readme_marker: str = "demo-results"  # the README block this configuration's results go to


DEMO = DemoConfig()
# `make demo-quick`: the same task and protocol on fewer test clips and seeds and the four core
# arms; a preview of the report (3 seeds: no sign-flip p can fall below 0.25).
QUICK = dataclasses.replace(DEMO, clips=1536, test_fraction=1 / 3, val_fraction=0.5, seeds=(0, 1, 2),
                            arms=(AUDIO_ONLY, VISUAL_ONLY, CONCAT, OGM_GE), label="make demo-quick")


def method_arms() -> tuple:
    """One concat arm per balancing method of the registry (``names.METHODS``), with the paper's
    rows where Table 2 has them (Modality-Drop of audio, of visual, the input dropped), in
    registry order."""
    from .reproduce import TABLE_ROWS

    variants: dict[str, list[Arm]] = {}
    for row in TABLE_ROWS[2]:
        method = row.settings.get("modulation", "none")
        variants.setdefault(method, []).append(Arm(row.name, {"fusion": "concat", **row.settings}))
    arms = []
    for method in names.METHODS:
        if method == "none":
            continue
        fusions = names.METHOD_FUSIONS.get(method)
        fusion = "concat" if fusions is None or "concat" in fusions else fusions[0]
        teachers = _TEACHERS.get(method, ())
        arms += variants.get(method) or [Arm(f"{fusion}+{method}", {"fusion": fusion, "modulation": method},
                                             teachers=teachers)]
    return tuple(arms)


# methods distilled from uni-modal models: their teachers are the demo's own uni-modal arms
_TEACHERS = {"umt": (("umt_teacher_audio", AUDIO_ONLY.name), ("umt_teacher_visual", VISUAL_ONLY.name))}


def _compare_arms() -> tuple:
    have = {a.name for a in DEMO.arms}
    return (*DEMO.arms, *(a for a in method_arms() if a.name not in have))


# `make compare`: every method on the demo's task, budget, protocol and statistics; the demo's
# arms keep their 10 seeds, every other method gets 5 (so ~25 methods fit 45 min on 2 cores).
COMPARE = dataclasses.replace(DEMO, arms=_compare_arms(), method_seeds=5, label="make compare",
                              readme_marker="compare-results")

def readme_markers(cfg: DemoConfig) -> tuple[str, str]:
    """The begin and end markers of ``cfg``'s results block in the README."""
    return (f"<!-- {cfg.readme_marker}:begin (written by `python -m cli.demo --update-readme`) -->",
            f"<!-- {cfg.readme_marker}:end -->")


README_BEGIN, README_END = readme_markers(DemoConfig())


def modulation_end(cfg: DemoConfig) -> int:
    """Last modulated epoch (0-based, inclusive): the first ``modulation_fraction`` of the epochs."""
    return max(0, math.ceil(cfg.epochs * cfg.modulation_fraction) - 1)


def arm_settings(cfg: DemoConfig, arm: Arm, runs=None, seed: int | None = None) -> dict:
    """Every TrainConfig field the demo sets for ``arm`` on top of its preset, in flag order:
    budget and evaluation (the same for every arm), the modulation window, the arm's own, and
    (given the runs folder and a seed) the run folders of its teachers for that seed."""
    window = cfg.epochs - 1 if arm.whole_run else modulation_end(cfg)
    out = {"epochs": cfg.epochs, "eval_every": cfg.epochs, "lr_step": lr_step(cfg), "modulation_end": window,
           **cfg.train, **arm.settings}
    if runs is not None and seed is not None:
        out.update({opt: str(runfolder.seed_dir(Path(runs) / teacher, seed)) for opt, teacher in arm.teachers})
    return out


def verdict_arms(cfg: DemoConfig) -> set[str]:
    """The arms the demo's verdict compares (always every seed)."""
    return {cfg.baseline, cfg.treated, cfg.ogm, cfg.control, cfg.audio_only, cfg.visual_only}


def arm_seeds(cfg: DemoConfig, arm: Arm) -> tuple:
    """The seeds ``arm`` trains on: every seed for the verdict's arms, the first ``method_seeds``
    for the others."""
    if cfg.method_seeds is None or arm.name in verdict_arms(cfg):
        return tuple(cfg.seeds)
    return tuple(cfg.seeds[:cfg.method_seeds])


# fields that name where a run lives or how it is executed, not what it trains
_PLACE_FIELDS = {"out", "shards", "workers", "device", "s3_endpoint"}


def setting_changes(stored: dict, wanted: dict) -> dict[str, tuple]:
    """Settings of a run's stored config.json that differ from the config it would get now:
    ``{field: (stored, wanted)}`` over the fields both know (a field added to TrainConfig since
    the run has its default there, so it is not a change) and that ``wanted`` sets (None or ""
    means "filled from the dataset at training time", as config.resolve leaves them); place and
    execution fields ignored."""
    def norm(v):
        return list(v) if isinstance(v, tuple) else v
    return {k: (stored[k], norm(wanted[k])) for k in sorted(set(stored) & set(wanted) - _PLACE_FIELDS)
            if wanted[k] not in (None, "") and stored[k] != norm(wanted[k])}


def lr_step(cfg: DemoConfig) -> int:
    """Epochs before the learning rate drops x0.1 (StepLR's period): ``lr_decay_fraction`` of the run."""
    return max(1, round(cfg.epochs * cfg.lr_decay_fraction))


def arm_problem(arm: Arm) -> str | None:
    """Why ``arm`` cannot run with this build (a method or setting it does not know), or None."""
    from .reproduce import unavailable

    return unavailable(arm.name, arm.settings)


# ----------------------------------------------------------------------------- data split

def split_counts(cfg: DemoConfig) -> dict[str, int]:
    """Clips per split; a function of the settings only (the README test relies on it)."""
    test = round(cfg.clips * cfg.test_fraction)
    val = round((cfg.clips - test) * cfg.val_fraction)
    return {"train": cfg.clips - test - val, "val": val, "test": test}


def assign_splits(names_, cfg: DemoConfig) -> dict[str, str]:
    """Clip name -> split: ordered by a hash of the name, the first ``test`` are test, the next
    ``val`` val (exact counts, no dependence on the order names are listed in)."""
    from avprep.datasets._base import hash_fraction

    ordered = sorted(names_, key=lambda n: (hash_fraction(n, cfg.synth_seed), n))
    counts = split_counts(dataclasses.replace(cfg, clips=len(ordered)))
    out = {}
    for i, name in enumerate(ordered):
        out[name] = "test" if i < counts["test"] else "val" if i < counts["test"] + counts["val"] else "train"
    return out


def write_split_files(raw, folder, cfg: DemoConfig) -> dict[str, Path]:
    """Write ``folder/<split>.csv`` (the OGM-GE CREMA-D format ``<clip>,<EMO>``) for the clips of
    the synthetic CREMA-D tree ``raw``; returns split -> path. Same clips, same bytes."""
    clip_names = sorted(p.stem for p in (Path(raw) / "VideoFlash").glob("*.flv"))
    if len(clip_names) != cfg.clips:
        raise RunFolderError(f"{raw}: {len(clip_names)} clips, expected {cfg.clips}; "
                             "delete the demo folder and run the demo again")
    split = assign_splits(clip_names, cfg)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for s in ("train", "val", "test"):
        lines = "".join(f"{n},{n.split('_')[2]}\n" for n in clip_names if split[n] == s)
        paths[s] = runfolder.atomic_write_text(folder / f"{s}.csv", lines)
    return paths


# ----------------------------------------------------------------------------- numbers

Groups = dict[str, list[RunRecord]]


def _values(groups: Groups, arm: str, key: str) -> dict[int, float]:
    """Seed -> the arm's ``key`` at its last epoch (probes of that epoch's last.pt only)."""
    return per_seed(groups.get(arm, []), key, at="last")


def reference_accuracy(groups: Groups, cfg: DemoConfig = DEMO) -> dict[int, float]:
    """Per seed, the fused test accuracy of a model that uses both cues fully: the audio-only
    model's answer on toned clips and the visual-only model's on the others,
    ``ref = A + (1 - p) (V - 1/K)`` with A, V the unimodal models' test accuracies at the last
    epoch, p the share of toned clips and K the classes. (A = p A_toned + (1 - p) / K, since no
    predictor beats chance on audio that carries no class, and V is the same on toned and
    toneless clips, since the tone is assigned independently of label and frames.)"""
    a, v = _values(groups, cfg.audio_only, "acc"), _values(groups, cfg.visual_only, "acc")
    p = cfg.audio_cue_fraction
    return {s: a[s] + (1 - p) * (v[s] - 1 / cfg.num_classes) for s in sorted(set(a) & set(v))}


def precondition(groups: Groups, cfg: DemoConfig = DEMO) -> dict:
    """The design's premises, paired by seed: ``gap`` (visual-only's test accuracy minus concat's
    visual branch: vision under-learnt in joint training, >= ``precondition_gap``) and ``headroom``
    (the reference minus concat's fused accuracy, >= ``headroom``); each a ``paired_difference``
    with ``holds`` (mean clears the threshold) and ``established`` (the 95% interval does)."""
    gap = stats.paired_difference(_values(groups, cfg.baseline, "acc_v"), _values(groups, cfg.visual_only, "acc"))
    room = stats.paired_difference(_values(groups, cfg.baseline, "acc"), reference_accuracy(groups, cfg))
    out = {}
    for name, d, threshold in (("gap", gap, cfg.precondition_gap), ("headroom", room, cfg.headroom)):
        holds = d["mean"] is not None and d["mean"] >= threshold
        out[name] = {**d, "threshold": threshold, "holds": holds,
                     "established": holds and d["ci"] is not None and d["ci"][0] >= threshold}
    out["holds"] = out["gap"]["holds"] and out["headroom"]["holds"]
    return out


def contrasts(cfg: DemoConfig, present=None) -> list[tuple[str, str]]:
    """The planned contrasts ``(treated, base)``, primary first: OGM-GE vs concat, every other
    multimodal arm vs concat (the positive control last), then OGM-GE vs OGM directly. Arms not
    in ``present`` (when given) are left out."""
    have = {a.name for a in cfg.arms if a.multimodal} if present is None else set(present)
    others = [a.name for a in cfg.arms if a.multimodal and a.name not in (cfg.baseline, cfg.treated, cfg.control)]
    out = [(cfg.treated, cfg.baseline), *((o, cfg.baseline) for o in others), (cfg.control, cfg.baseline),
           (cfg.treated, cfg.ogm)]
    return [c for c in out if c[0] in have and c[1] in have]


def _label(c: tuple[str, str]) -> str:
    return f"{c[0]} − {c[1]}"


def _families(cfg: DemoConfig, planned: list[tuple[str, str]]) -> dict[str, list[str]]:
    """The planned contrasts' labels by Holm family: ``verdict`` (both arms are the verdict's) and
    ``exploratory`` (compare's other methods)."""
    verdict = verdict_arms(cfg)
    out: dict[str, list[str]] = {}
    for c in planned:
        out.setdefault("verdict" if set(c) <= verdict else "exploratory", []).append(_label(c))
    return out


def analyse(groups: Groups, cfg: DemoConfig = DEMO) -> dict:
    """Every planned contrast on the primary endpoint (paired difference, Holm-adjusted sign-flip
    p over the family, TOST at the pre-registered margin, MDE) and on each secondary endpoint
    (Holm within the secondary family). Returns ``{"primary": {label: d}, "secondary": {label:
    {key: d}}, "order": [labels]}``."""
    planned = contrasts(cfg, [a for a, runs in groups.items() if runs])
    primary = {_label(c): stats.paired_difference(_values(groups, c[1], PRIMARY), _values(groups, c[0], PRIMARY))
               for c in planned}
    # Holm runs within each family: the verdict's contrasts are confirmatory; compare's other methods
    # (fewer seeds) form their own exploratory family, so adding methods never dilutes the verdict.
    for family in _families(cfg, planned).values():
        m = len(family)
        for label, adj in stats.holm({k: primary[k]["p"] for k in family}).items():
            d = primary[label]
            d["p_holm"] = adj
            d["family_size"] = m
            d["tost"] = stats.tost(d["diffs"], cfg.equivalence_margin)
            d["bound"] = stats.equivalence_bound(d["diffs"], cfg.level)
            d["mde"] = stats.minimal_detectable_effect(d["sd"], d["n"], alpha=cfg.level, power=cfg.power)
            d["mde_family"] = stats.minimal_detectable_effect(d["sd"], d["n"], alpha=cfg.level / max(m, 1),
                                                              power=cfg.power)
    secondary = {_label(c): {k: stats.paired_difference(_values(groups, c[1], k), _values(groups, c[0], k))
                             for k in SECONDARY} for c in planned}
    flat = {(lab, k): d["p"] for lab, ds in secondary.items() for k, d in ds.items()}
    for (lab, k), adj in stats.holm(flat).items():
        secondary[lab][k]["p_holm"] = adj
    return {"primary": primary, "secondary": secondary, "order": [_label(c) for c in planned],
            "contrasts": planned}


MECHANISM_KEYS = ("rho_a", "k_a", "k_v", "update_norm_a", "update_norm_v")


def mechanism(groups: Groups, cfg: DemoConfig = DEMO) -> dict:
    """Per multimodal arm, the per-epoch means over seeds of ``MECHANISM_KEYS`` (metrics.jsonl;
    a key absent from a run's lines is None), and over the modulated epochs: mean k_a and the
    audio/visual encoder update norms relative to the baseline's (ratio of means, paired epochs).
    ``recorded``: whether the runs carry the update norms at all."""
    window = range(0, modulation_end(cfg) + 1)
    per_arm, recorded = {}, False
    for arm in cfg.arms:
        runs = groups.get(arm.name) or []
        if not arm.multimodal or not runs:
            continue
        curves: dict[str, dict[int, float | None]] = {}
        for key in MECHANISM_KEYS:
            rows = [{int(m["epoch"]): m.get(key) for m in r.metrics if "epoch" in m} for r in runs]
            epochs = sorted(set.intersection(*(set(x) for x in rows)))
            curves[key] = {e: _mean([x[e] for x in rows]) for e in epochs}
        recorded = recorded or any(v is not None for v in curves["update_norm_a"].values())
        per_arm[arm.name] = curves
    summary = {}
    base = per_arm.get(cfg.baseline)
    for name, curves in per_arm.items():
        entry = {"k_a": _mean([curves["k_a"].get(e) for e in window if e in curves["k_a"]])}
        for key in ("update_norm_a", "update_norm_v"):
            ours = [curves[key].get(e) for e in window]
            theirs = [base[key].get(e) for e in window] if base else [None] * len(ours)
            pairs = [(x, y) for x, y in zip(ours, theirs) if x is not None and y]
            entry[key] = sum(x for x, _ in pairs) / sum(y for _, y in pairs) if pairs else None
        summary[name] = entry
    return {"curves": per_arm, "summary": summary, "recorded": recorded, "window": (window.start, window.stop - 1)}


def _mean(values) -> float | None:
    """Mean of the values; None when there are none or any is missing."""
    values = list(values)
    if not values or any(v is None for v in values):
        return None
    return sum(float(v) for v in values) / len(values)


# ----------------------------------------------------------------------------- text

def _pts(x: float | None, sign: bool = True) -> str:
    if x is None:
        return "—"
    return f"{100 * x:+.1f}" if sign else f"{100 * x:.1f}"


def _p(p: float | None) -> str:
    if p is None:
        return "—"
    return f"{p:.4f}" if p < 0.001 else f"{p:.3f}"


def _ms(ms) -> str:
    return format_cell("acc", ms)


def _ci(d: dict) -> str:
    if d["ci"] is None:
        return "no interval (one seed)"
    return f"95% CI {_pts(d['ci'][0])} to {_pts(d['ci'][1])}"


def design_markdown(cfg: DemoConfig = DEMO) -> str:
    """The task and why it is built this way (deterministic)."""
    p = cfg.audio_cue_fraction
    return (
        "### Design\n\n"
        f"A synthetic CREMA-D-layout dataset with two class cues. **Audio**: a class tone at {cfg.audio_snr:g} dB "
        f"SNR, easy (an audio-only model is right on every toned clip after one epoch), but present on only "
        f"{100 * p:.0f}% of the clips; the others' audio is noise only. **Visual**: a class colour under pixel "
        f"noise at {cfg.visual_snr:g} dB on every clip: weak and slow to learn, but a visual-only model learns it.\n\n"
        "Why: joint training fits the toned clips through audio at once and then memorises the few toneless "
        "training clips through audio as well (their noise is as distinctive as any pattern to a CNN), so the "
        "training loss reaches ~0 and the visual encoder stops receiving gradient: joint training under-learns "
        "vision although vision alone could learn it (the paper's Figure 1). At test, fused logits are the sum of "
        "the audio and visual branches, so on a toneless clip the fused prediction is the visual branch's: an "
        "under-trained visual encoder costs *fused* accuracy, the paper's headline endpoint. A purely "
        "complementary design (audio gives a class group, vision the class within it) would show no suppression: "
        "the within-group loss reaches vision whatever audio does.\n\n"
        "**Reference for the headroom** (a model that uses both cues fully): per seed, the audio-only model's "
        "answer on toned clips and the visual-only model's on the others, "
        f"ref = A + (1 − p)(V − 1/K), with A and V the unimodal models' test accuracies at the last epoch, "
        f"p = {p:g} the share of toned clips and K = {cfg.num_classes} classes (no predictor beats chance on "
        "audio without a tone, and the tone is drawn independently of label and frames).\n")


def protocol_markdown(cfg: DemoConfig = DEMO, present=None) -> str:
    """The pre-registered protocol (written before any number; deterministic)."""
    planned = contrasts(cfg, present)
    families = _families(cfg, planned)
    m = len(families.get("verdict", ()))
    n_explore = len(families.get("exploratory", ()))
    explore = ("" if not n_explore else
               f"; the other methods' {n_explore} contrasts are an exploratory family with its own Holm correction "
               f"(with {cfg.method_seeds} seeds the exact sign-flip p cannot go below 2/2^{cfg.method_seeds} = "
               f"{stats.sign_flip_floor(cfg.method_seeds or 1):.4g}, so read them by their intervals and MDEs)")
    lines = [
        "### Protocol (pre-registered: fixed before the runs, stated before the numbers)\n",
        f"- **Primary endpoint**: {ENDPOINTS[PRIMARY]} at the **last epoch** ({_epochs(cfg.epochs)}, the same "
        "number of optimizer steps for every arm, SGD with momentum 0.9 and weight decay 1e-4, the learning rate "
        f"divided by 10 after epoch {lr_step(cfg) - 1}; no epoch is selected).",
        "- **Secondary endpoints**, also at the last epoch: " + "; ".join(ENDPOINTS[k] for k in SECONDARY)
        + " (the probes are fitted on the frozen encoders of last.pt, so no selected epoch enters them).",
        f"- **Precondition** (the design's premise, checked before reading any contrast): concat's visual branch "
        f"at least {100 * cfg.precondition_gap:.0f} points below the visual-only model, and concat's fused "
        f"accuracy at least {100 * cfg.headroom:.0f} points below the reference; both paired by seed.",
        f"- **Planned contrasts** on the primary endpoint, paired by seed ({len(cfg.seeds)} seeds"
        + ("" if cfg.method_seeds is None or cfg.method_seeds >= len(cfg.seeds) else
           f"; {cfg.method_seeds} for the methods outside the demo's verdict, whose MDE is larger accordingly")
        + "): "
        + "; ".join(f"`{t}` − `{b}`" for t, b in planned)
        + f". The first is the primary contrast; `{cfg.control}` is the **positive control** (modulation so strong "
        "that it must move the endpoint if the endpoint can move: if it does not, a null result of the other arms "
        "says nothing).",
        f"- **Tests**: per-seed paired differences, their mean with a 95% Student-t interval, and the exact "
        f"two-sided sign-flip permutation test (all 2^n sign patterns). **Holm's** step-down correction over the "
        f"{m} planned contrasts of the verdict (family-wise level {cfg.level:g}){explore}; secondary endpoints: "
        "Holm over their own family "
        "(supportive, not confirmatory).",
        f"- **Verdict rule**: an effect is claimed when the Holm-adjusted p ≤ {cfg.level:g}. Otherwise \"no effect "
        f"larger than {100 * cfg.equivalence_margin:g} points\" is claimed only when the paired TOST equivalence test "
        f"at that margin gives p < {cfg.level:g}; else the contrast is **inconclusive**, and the report says which "
        "effects the data cannot exclude.",
        f"- **Power**: the minimal detectable effect (MDE, {100 * cfg.power:.0f}% power, two-sided paired t at "
        f"{cfg.level:g}) from each contrast's observed paired SD, and at the first Holm step ({cfg.level:g}/{m}).",
        "- **Mechanism**: per epoch, the mean discrepancy ratio rho_a, the coefficients k_a and k_v and the norm "
        "of each encoder's parameter update per step (metrics.jsonl `update_norm_a`, `update_norm_v`).",
    ]
    return "\n".join(lines) + "\n"


def _precondition_text(pre: dict, cfg: DemoConfig) -> list[str]:
    lines = ["## Precondition", ""]
    g, h = pre["gap"], pre["headroom"]
    if g["n"] == 0 or h["n"] == 0:
        return lines + [f"Not measured: `{cfg.visual_only}`, `{cfg.audio_only}` and `{cfg.baseline}` share no seed.",
                        ""]

    def verdict(d: dict) -> str:
        if d["established"]:
            return "**met**"
        if d["holds"]:
            return (f"**met** on the mean, but its 95% interval reaches below {100 * d['threshold']:.0f} points "
                    "(not established with this many seeds)")
        return "**not met**"

    lines.append(
        f"- Vision under-learnt: inside `{cfg.baseline}` the visual branch scores {_ms(g['base'])}% on test, a "
        f"`{cfg.visual_only}` model {_ms(g['treated'])}%: a gap of {_pts(g['mean'], False)} points ({_ci(g)}, "
        f"{g['n']} paired seeds; needed: {100 * cfg.precondition_gap:.0f}): {verdict(g)}.")
    lines.append(
        f"- Headroom: `{cfg.baseline}` fuses to {_ms(h['base'])}%, the reference that uses both cues fully "
        f"{_ms(h['treated'])}%: {_pts(h['mean'], False)} points of headroom ({_ci(h)}; needed: "
        f"{100 * cfg.headroom:.0f}): {verdict(h)}.")
    if not pre["holds"]:
        lines.append("")
        lines.append("The premise **does not hold**, so the contrasts below do not test what the demo is built to "
                     "show; they are reported as measured.")
    return lines + [""]


def _primary_verdict(label: str, d: dict, cfg: DemoConfig) -> str:
    t, b = label.split(" − ")
    if d["n"] == 0:
        return f"`{t}` vs `{b}`: could not be compared (no common seed)."
    head = (f"`{t}` vs `{b}`: {_pts(d['mean'])} points ({_ms(d['treated'])}% vs {_ms(d['base'])}%, {_ci(d)}, "
            f"sign-flip p = {_p(d['p'])}, Holm p = {_p(d['p_holm'])}; higher in {d['up']}, lower in {d['down']} "
            f"of {d['n']} seeds)")
    if d["p_holm"] is not None and d["p_holm"] <= cfg.level:
        return f"{head}: **{'raised' if d['mean'] > 0 else 'lowered'}** the fused accuracy."
    tost = d["tost"]
    margin = 100 * cfg.equivalence_margin
    if tost["p"] is not None and tost["p"] < cfg.level:
        return f"{head}: **no effect larger than {margin:g} points** (TOST p = {_p(tost['p'])})."
    bound = "" if d["bound"] is None else f"; effects up to {100 * d['bound']:.1f} points are not excluded"
    tost_p = "" if tost["p"] is None else f" (TOST at ±{margin:g} points: p = {_p(tost['p'])})"
    floor = stats.sign_flip_floor(d["n"])
    if floor > cfg.level:
        # no data could make this contrast significant: say so instead of "no effect detected"
        side = ("contains 0" if d["ci"] is None or d["ci"][0] <= 0 <= d["ci"][1] else
                "lies above 0" if d["ci"][0] > 0 else "lies below 0")
        return (f"{head}: **not testable with {d['n']} seeds** (the exact sign-flip p cannot go below "
                f"{floor:.4g} > {cfg.level:g}); descriptively, its 95% interval {side}{tost_p}{bound}.")
    return f"{head}: **inconclusive**: no effect detected, none excluded{tost_p}{bound}."


def _secondary_table(res: dict) -> list[str]:
    head = ["contrast", *(ENDPOINTS[k] for k in SECONDARY)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in res["order"]:
        cells = [label]
        for k in SECONDARY:
            d = res["secondary"][label][k]
            cells.append("—" if d["n"] == 0 else f"{_pts(d['mean'])} ({_ci(d).replace('95% CI ', '')}; "
                                                  f"Holm p {_p(d['p_holm'])})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _primary_table(res: dict) -> list[str]:
    lines = ["| contrast | seeds | mean difference (points) | 95% CI | sign-flip p | Holm p | TOST p | MDE (80%) |",
             "|---|---|---|---|---|---|---|---|"]
    for label in res["order"]:
        d = res["primary"][label]
        ci = "—" if d["ci"] is None else f"{_pts(d['ci'][0])} to {_pts(d['ci'][1])}"
        lines.append(f"| {label} | {d['n']} | {_pts(d['mean'])} | {ci} | {_p(d['p'])} | {_p(d['p_holm'])} | "
                     f"{_p(d['tost']['p'])} | {_pts(d['mde'], False)} |")
    return lines


def _mechanism_text(mech: dict, cfg: DemoConfig) -> list[str]:
    lo, hi = mech["window"]
    lines = ["## Mechanism", "",
             f"`mechanism.png`: per epoch, mean over seeds of rho_a, k_a, k_v and each encoder's update norm "
             f"(modulated epochs {lo}–{hi} shaded; the positive control modulates every epoch)."]
    for name, s in mech["summary"].items():
        if name == cfg.baseline:
            continue
        parts = [f"mean k_a {s['k_a']:.2f}" if s["k_a"] is not None else "k_a not recorded"]
        if mech["recorded"]:
            for key, what in (("update_norm_a", "audio"), ("update_norm_v", "visual")):
                if s[key] is not None:
                    parts.append(f"{what} encoder update {s[key]:.2f}× `{cfg.baseline}`'s")
        lines.append(f"- `{name}`, epochs {lo}–{hi}: " + ", ".join(parts) + ".")
    ge = [a.name for a in cfg.arms if a.name in mech["summary"] and a.settings.get("modulation") == "ogm-ge"]
    if mech["recorded"] and ge:
        lines.append(f"- The update of {', '.join(f'`{n}`' for n in ge)} includes the Gaussian enhancement (noise "
                     "N(0, std(g)) added to the scaled gradient of the slowed encoder), so its norm is not k·g "
                     "alone; OGM's shows the scaling by itself.")
    if not mech["recorded"]:
        lines.append("- Encoder update norms: **not recorded** (this build's metrics.jsonl has no `update_norm_a` / "
                     "`update_norm_v`), so the plot shows k and rho only.")
    return lines + [""]


def conclusion(groups: Groups, cfg: DemoConfig = DEMO) -> str:
    """Markdown generated from the numbers, whichever way they fall: the precondition, power, the
    primary contrasts (with the positive control and OGM-GE vs OGM), the secondary endpoints and
    the mechanism."""
    pre = precondition(groups, cfg)
    res = analyse(groups, cfg)
    lines = _precondition_text(pre, cfg)
    lines += ["## Primary endpoint: fused test accuracy at the last epoch", ""]
    if not res["order"]:
        lines += ["No planned contrast could be measured.", ""]
    else:
        lines += _primary_table(res) + [""]
        lines += ["- " + _primary_verdict(label, res["primary"][label], cfg) for label in res["order"]]
        primary = res["primary"][res["order"][0]]
        if primary["mde"] is not None:
            lines += ["", f"Power: the paired SD of the primary contrast is {_pts(primary['sd'], False)} points over "
                      f"{primary['n']} seeds, so its minimal detectable effect (80% power) is "
                      f"{_pts(primary['mde'], False)} points at level {cfg.level:g} and "
                      f"{_pts(primary['mde_family'], False)} points at the first Holm step."]
        control = res["primary"].get(_label((cfg.control, cfg.baseline)))
        if control is not None and control["n"]:
            moved = control["p_holm"] is not None and control["p_holm"] <= cfg.level
            lines += ["", f"Positive control: `{cfg.control}` moved the fused accuracy by {_pts(control['mean'])} "
                      f"points (Holm p = {_p(control['p_holm'])}): " +
                      ("the endpoint is sensitive to modulating the encoders." if moved else
                       "**not detected**, so the endpoint may be insensitive to modulation at this budget and a null "
                       "result above is uninformative.")]
        lines += ["", "## Secondary endpoints (last epoch)", "",
                  "Paired differences in points (95% CI; Holm over this table's family):", ""]
        lines += _secondary_table(res) + [""]
    lines += _mechanism_text(mechanism(groups, cfg), cfg)
    lines += ["An interval that contains 0 is no evidence that there is no effect; only the TOST line says which "
              "effects the data exclude."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- README block

def setup_markdown(cfg: DemoConfig = DEMO) -> str:
    """The deterministic description of the demo (settings and split sizes only): the README's
    copy must equal this for DEMO (tested)."""
    n = split_counts(cfg)
    arms = ", ".join(f"`{a.name}`" for a in cfg.arms)
    return (f"Synthetic CREMA-D layout, {cfg.clips} clips of {cfg.duration:g} s, {cfg.num_classes} classes: audio "
            f"cue at {cfg.audio_snr:g} dB SNR (a class tone) on {100 * cfg.audio_cue_fraction:.0f}% of the clips, "
            f"visual cue at {cfg.visual_snr:g} dB (a class colour under pixel noise) on all. Splits: {n['train']} "
            f"train, {n['val']} val, {n['test']} test clips (one test clip = {100 / n['test']:.2f} points). Arms "
            f"{arms}; preset `{cfg.preset}` (SGD), {_epochs(cfg.epochs)}, the learning rate ×0.1 after epoch "
            f"{lr_step(cfg) - 1}, modulation in epochs "
            f"0–{modulation_end(cfg)}, seeds {seeds_text(cfg)}.\n")


def seeds_text(cfg: DemoConfig) -> str:
    """The seeds, and those of the arms outside the verdict when they have fewer."""
    text = _seed_list(cfg.seeds)
    if cfg.method_seeds is not None and cfg.method_seeds < len(cfg.seeds):
        text += f" (the other methods: {_seed_list(cfg.seeds[:cfg.method_seeds])})"
    return text


def _epochs(n: int) -> str:
    return f"{n} epoch{'s' if n != 1 else ''}"


def _seed_list(seeds) -> str:
    seeds = list(seeds)
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}–{seeds[-1]}"
    return ", ".join(map(str, seeds))


def readme_block(cfg: DemoConfig, table: str, conclusion_md: str, footer: str = "") -> str:
    """The README's results block: setup (deterministic), table, findings, footer (timings)."""
    begin, end = readme_markers(cfg)
    parts = [begin, "", setup_markdown(cfg), table.rstrip() + "\n",
             conclusion_md.replace("## ", "#### ").rstrip() + "\n"]
    if footer:
        parts.append(footer.rstrip() + "\n")
    parts.append(end)
    return "\n".join(parts) + "\n"


def readme_section(text: str, cfg: DemoConfig | None = None) -> str | None:
    """The block between ``cfg``'s markers (the demo's by default) in ``text``, markers included, or None."""
    begin, end_marker = readme_markers(cfg or DEMO)
    start = text.find(begin)
    end = text.find(end_marker, start + 1)
    if start < 0 or end < 0:
        return None
    return text[start:end + len(end_marker)] + "\n"


def update_readme(path, block: str, cfg: DemoConfig | None = None) -> Path:
    """Replace ``cfg``'s block (the demo's by default) in README ``path`` with ``block``."""
    path = Path(path)
    text = path.read_text()
    old = readme_section(text, cfg)
    if old is None:
        begin, end = readme_markers(cfg or DEMO)
        raise RunFolderError(f"{path}: no {begin!r} ... {end!r} markers")
    return runfolder.atomic_write_text(path, text.replace(old, block, 1))
