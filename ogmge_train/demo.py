"""The demo experiment (``make demo``, ``make compare``): its settings in one place, the data
split it trains on, and the findings generated from its numbers.

The task is built, in the spirit of the field's Colored-and-Gray-MNIST, so that joint training
under-uses one modality: a synthetic CREMA-D-layout dataset whose audio cue (a class tone) is
learnt within an epoch or two and whose visual cue (a class colour under heavy pixel noise) is
weaker but learnable on its own. The demo checks that premise (the *precondition*: inside the
concat model the visual branch stays >= 10 points below a visual-only model) before it reads
anything into the comparison of concat with concat + OGM-GE, and reports paired differences
over seeds with a 95% t-interval. ``cli/demo.py`` runs the real commands with these settings;
this module holds no CLI strings and runs nothing.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from . import runfolder
from .errors import RunFolderError
from .report import RunRecord, format_cell, paired_difference, per_seed

__all__ = ["Arm", "DemoConfig", "DEMO", "COMPARE", "README_BEGIN", "README_END", "modulation_end",
           "split_counts", "assign_splits", "write_split_files", "arm_problem", "precondition",
           "comparisons", "conclusion", "setup_markdown", "readme_block", "readme_section",
           "update_readme"]


@dataclass(frozen=True)
class Arm:
    name: str                 # folder name under OUT/runs and row label of the report
    settings: dict            # TrainConfig fields on top of the preset (e.g. {"modulation": "ogm"})


_UNIMODAL_AUDIO = Arm("audio-only", {"modality": "audio", "modulation": "none"})
_UNIMODAL_VISUAL = Arm("visual-only", {"modality": "visual", "modulation": "none"})
_CONCAT = Arm("concat", {"fusion": "concat", "modulation": "none"})
_OGM_GE = Arm("concat+ogm-ge", {"fusion": "concat", "modulation": "ogm-ge"})


@dataclass(frozen=True)
class DemoConfig:
    """Every setting of the demo. SNRs are in dB (see avprep.synth)."""

    clips: int = 640
    # The demo writes its own split files: test_fraction of the clips (by a hash of the clip
    # name) are test, val_fraction of the rest val. 256 test clips: one clip = 0.39 points.
    test_fraction: float = 0.4
    val_fraction: float = 0.1
    audio_snr: float = -14.0           # audio-only: ~100% test accuracy within 2-3 epochs
    visual_snr: float = -26.0          # visual-only: well above chance, far from perfect
    synth_seed: int = 0
    duration: float = 2.0              # seconds per clip (spectrograms are tiled to CREMA-D's 3 s)
    # extraction: small frames and a 65x75 STFT keep the CPU encoders fast (the class tones,
    # 250-3500 Hz, still fall in distinct 125-Hz bins)
    frame_size: int = 64
    spec: dict = field(default_factory=lambda: {"n_fft": 128, "win_length": 128, "hop_length": 640})
    shard_size: int = 64
    extract_workers: int = 2
    # training: the `demo` preset (small CNNs, Adam) for every arm, same budget and seeds
    preset: str = "demo"
    epochs: int = 10
    seeds: tuple = (0, 1, 2, 3, 4)
    # OGM-GE modulates the first half of the epochs, as the reference code does (epochs 0-50 of 100)
    modulation_fraction: float = 0.5
    train: dict = field(default_factory=dict)     # extra settings for every arm
    probe_steps: int = 100
    arms: tuple = (_UNIMODAL_AUDIO, _UNIMODAL_VISUAL, _CONCAT, _OGM_GE)
    baseline: str = "concat"           # the arm every other multimodal arm is compared with
    treated: str = "concat+ogm-ge"     # the arm the headline verdict is about
    visual_only: str = "visual-only"   # the precondition's reference
    precondition_gap: float = 0.10     # the visual branch must stay this far below visual-only


DEMO = DemoConfig()


def _compare_arms() -> tuple:
    from .reproduce import TABLE_ROWS

    # Table 2's other rows; Modality-Drop as these arms were measured (pooled features, not input)
    extra = tuple(Arm(row.name, {k: v for k, v in row.settings.items() if k != "drop_at"})
                  for row in TABLE_ROWS[2] if row.name not in ("concat", "concat+ogm-ge"))
    more = tuple(Arm(f"concat+{m}", {"fusion": "concat", "modulation": m})
                 for m in ("opm", "opm-ge", "mmpareto", "pmr", "agm"))
    return (*DEMO.arms, *extra, *more)


# `make compare`: every method on the demo's data, seeds and budget (<= 45 min on 2 cores).
COMPARE = dataclasses.replace(DEMO, arms=_compare_arms())

README_BEGIN = "<!-- demo-results:begin (written by `python -m cli.demo --update-readme`) -->"
README_END = "<!-- demo-results:end -->"


def modulation_end(cfg: DemoConfig) -> int:
    """Last modulated epoch (0-based, inclusive): the first ``modulation_fraction`` of the epochs."""
    return max(0, math.ceil(cfg.epochs * cfg.modulation_fraction) - 1)


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


def assign_splits(names, cfg: DemoConfig) -> dict[str, str]:
    """Clip name -> split: ordered by a hash of the name, the first ``test`` are test, the next
    ``val`` val (exact counts, no dependence on the order names are listed in)."""
    from avprep.datasets._base import hash_fraction

    names = sorted(names, key=lambda n: (hash_fraction(n, cfg.synth_seed), n))
    counts = split_counts(dataclasses.replace(cfg, clips=len(names)))
    out = {}
    for i, name in enumerate(names):
        out[name] = "test" if i < counts["test"] else "val" if i < counts["test"] + counts["val"] else "train"
    return out


def write_split_files(raw, folder, cfg: DemoConfig) -> dict[str, Path]:
    """Write ``folder/<split>.csv`` (the OGM-GE CREMA-D format ``<clip>,<EMO>``) for the clips of
    the synthetic CREMA-D tree ``raw``; returns split -> path. Same clips, same bytes."""
    names = sorted(p.stem for p in (Path(raw) / "VideoFlash").glob("*.flv"))
    if len(names) != cfg.clips:
        raise RunFolderError(f"{raw}: {len(names)} clips, expected {cfg.clips}; "
                             "delete the demo folder and run the demo again")
    split = assign_splits(names, cfg)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for s in ("train", "val", "test"):
        lines = "".join(f"{n},{n.split('_')[2]}\n" for n in names if split[n] == s)
        paths[s] = runfolder.atomic_write_text(folder / f"{s}.csv", lines)
    return paths


# ----------------------------------------------------------------------------- findings

def _ms(ms) -> str:
    return format_cell("acc", ms)


def _interval(d: dict) -> str:
    if d["ci"] is None:
        return "one seed, no interval"
    lo, hi = d["ci"]
    return f"95% CI {100 * lo:+.1f} to {100 * hi:+.1f}"


def precondition(groups: dict[str, list[RunRecord]], cfg: DemoConfig = DEMO) -> dict:
    """Inside ``baseline`` (concat), is the visual branch >= ``precondition_gap`` below a
    visual-only model? Paired by seed: ``gap`` = visual-only acc - concat's visual-branch acc."""
    ref = per_seed(groups.get(cfg.visual_only, []), "acc")
    branch = per_seed(groups.get(cfg.baseline, []), "acc_v")
    d = paired_difference(branch, ref)
    gap = d["mean"]
    holds = gap is not None and gap >= cfg.precondition_gap
    # established: the whole 95% interval of the gap clears the threshold
    established = holds and d["ci"] is not None and d["ci"][0] >= cfg.precondition_gap
    return {**d, "gap": gap, "holds": holds, "established": established, "visual_only": d["treated"],
            "branch": d["base"]}


def comparisons(groups: dict[str, list[RunRecord]], cfg: DemoConfig = DEMO) -> dict[str, dict]:
    """For every multimodal arm but the baseline: paired differences from the baseline on the
    visual probe, the fused accuracy and the audio probe (metric key -> paired_difference)."""
    base = groups.get(cfg.baseline, [])
    out = {}
    for arm in cfg.arms:
        if arm.name == cfg.baseline or arm.settings.get("modality", "both") != "both":
            continue
        runs = groups.get(arm.name)
        if not runs:
            continue
        out[arm.name] = {key: paired_difference(per_seed(base, key), per_seed(runs, key))
                         for key in ("probe_v", "acc", "acc_v", "probe_a")}
    return out


_WHAT = {"probe_v": "visual linear-probe accuracy", "acc": "fused test accuracy",
         "acc_v": "visual-branch test accuracy", "probe_a": "audio linear-probe accuracy"}


def _direction(d: dict) -> str:
    if d["n"] == 0:
        return "could not be compared"
    if d["ci"] is None:
        return "changed (one seed: not tested)" if d["mean"] else "did not change"
    lo, hi = d["ci"]
    if lo > 0:
        return "raised"
    if hi < 0:
        return "lowered"
    return "did not detectably change"


def _sentence(arm: str, base: str, key: str, d: dict) -> str:
    if d["n"] == 0:
        return f"The {_WHAT[key]} could not be compared (no seed has it for both `{base}` and `{arm}`)."
    return (f"`{arm}` **{_direction(d)}** the {_WHAT[key]}: {_ms(d['treated'])}% vs {_ms(d['base'])}% "
            f"for `{base}`, paired difference {100 * d['mean']:+.1f} points ({_interval(d)}; higher in "
            f"{d['up']} and lower in {d['down']} of {d['n']} seeds).")


def conclusion(groups: dict[str, list[RunRecord]], cfg: DemoConfig = DEMO) -> str:
    """Markdown: the precondition, then the verdict on the treated arm (every arm for compare),
    generated from the numbers; it says what it finds whichever way it falls."""
    pre = precondition(groups, cfg)
    lines = ["## Precondition", ""]
    if pre["n"] == 0:
        lines.append(f"Not measured: `{cfg.visual_only}` and `{cfg.baseline}` share no seed.")
    else:
        lines.append(
            f"Inside `{cfg.baseline}` the visual branch scores {_ms(pre['branch'])}% on test, a "
            f"`{cfg.visual_only}` model {_ms(pre['visual_only'])}%: a gap of {100 * pre['gap']:.1f} points "
            f"({_interval(pre)}, {pre['n']} paired seeds). The demo needs a gap of at least "
            f"{100 * cfg.precondition_gap:.0f} points (joint training under-uses the visual modality): it "
            + (("**holds**." if pre["established"] else
                "**holds** on the mean, but its 95% interval reaches below "
                f"{100 * cfg.precondition_gap:.0f} points: not established with this many seeds.")
               if pre["holds"] else
               "**does not hold**, so the comparison below does not test what the demo is built to show."))
    lines += ["", "## Verdict", "",
              f"Each arm against `{cfg.baseline}` (same data, seeds and budget), paired by seed, with a "
              "95% t-interval of the mean difference over seeds:", ""]
    found = comparisons(groups, cfg)
    order = [cfg.treated, *(a for a in found if a != cfg.treated)]
    for arm in order:
        if arm not in found:
            continue
        for key in ("probe_v", "acc", "probe_a"):
            lines.append("- " + _sentence(arm, cfg.baseline, key, found[arm][key]))
    lines += ["", "An interval that contains 0 means no difference was detected with this many seeds; "
              "it is not evidence that there is none."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- README block

def setup_markdown(cfg: DemoConfig = DEMO) -> str:
    """The deterministic description of the demo (settings and split sizes only): the README's
    copy must equal this for DEMO (tested)."""
    n = split_counts(cfg)
    arms = ", ".join(f"`{a.name}`" for a in cfg.arms)
    return (f"Synthetic CREMA-D layout, {cfg.clips} clips of {cfg.duration:g} s, 6 classes: audio cue at "
            f"{cfg.audio_snr:g} dB SNR (a class tone), visual cue at {cfg.visual_snr:g} dB (a class colour "
            f"under pixel noise). Splits: {n['train']} train, {n['val']} val, {n['test']} test clips "
            f"(one test clip = {100 / n['test']:.2f} points). Arms {arms}; preset `{cfg.preset}`, "
            f"{cfg.epochs} epochs, modulation in epochs 0–{modulation_end(cfg)}, seeds "
            f"{', '.join(map(str, cfg.seeds))}.\n")


def readme_block(cfg: DemoConfig, table: str, conclusion_md: str, footer: str = "") -> str:
    """The README's results block: setup (deterministic), table, findings, footer (timings)."""
    parts = [README_BEGIN, "", setup_markdown(cfg), table.rstrip() + "\n",
             conclusion_md.replace("## ", "#### ").rstrip() + "\n"]
    if footer:
        parts.append(footer.rstrip() + "\n")
    parts.append(README_END)
    return "\n".join(parts) + "\n"


def readme_section(text: str) -> str | None:
    """The block between the markers in ``text`` (markers included), or None."""
    start = text.find(README_BEGIN)
    end = text.find(README_END, start + 1)
    if start < 0 or end < 0:
        return None
    return text[start:end + len(README_END)] + "\n"


def update_readme(path, block: str) -> Path:
    """Replace the block between the markers in README ``path`` with ``block``."""
    path = Path(path)
    text = path.read_text()
    old = readme_section(text)
    if old is None:
        raise RunFolderError(f"{path}: no {README_BEGIN!r} ... {README_END!r} markers")
    return runfolder.atomic_write_text(path, text.replace(old, block, 1))
