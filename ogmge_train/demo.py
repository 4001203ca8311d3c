"""The demo experiment (``make demo``): its settings in one place, and the verdict from its numbers.

The demo reproduces the paper's point on a synthetic CREMA-D-layout dataset whose audio cue
(a class tone) is dominant and whose visual cue (a class colour under heavy pixel noise) is
weaker but informative. Four arms share the data, seed list and budget: audio-only,
visual-only, concat fusion, and concat fusion + OGM-GE. ``cli/demo.py`` runs the real CLIs
with these settings; this module only holds them and turns the results into sentences.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .report import RunRecord, mean_std, run_values

__all__ = ["DemoConfig", "DEMO", "Arm", "verdict", "conclusion", "modulation_end"]


@dataclass(frozen=True)
class Arm:
    name: str                 # folder name under OUT/runs and row label of the report
    options: tuple            # extra `ogmge-train` options


@dataclass(frozen=True)
class DemoConfig:
    """Every setting of the demo. SNRs are in dB (see avprep.synth)."""

    clips: int = 360                   # ~36 test and ~32 val clips
    audio_snr: float = -14.0           # audio-only: 95-100% test accuracy within 2-3 epochs
    visual_snr: float = -28.0          # visual-only: 50-60% after 10 epochs (chance: 17%)
    synth_seed: int = 0
    # extraction: small frames and a 65x75 STFT keep the CPU encoders fast (the class tones,
    # 250-3500 Hz, still fall in distinct 125-Hz bins)
    frame_size: int = 64
    spec_args: tuple = ("--n-fft", "128", "--win-length", "128", "--hop-length", "640")
    shard_size: int = 64
    extract_workers: int = 2
    # training: the `demo` preset (small CNNs, Adam) for every arm, same budget and seeds
    preset: str = "demo"
    epochs: int = 10
    seeds: tuple = (0, 1, 2)
    # OGM-GE modulates the first half of the epochs, as the reference code does (epochs 0-50 of 100)
    modulation_fraction: float = 0.5
    train_args: tuple = ()             # extra options for every arm, e.g. ("--alpha", "0.5")
    probe_steps: int = 100
    arms: tuple = field(default=(
        Arm("audio-only", ("--modality", "audio", "--modulation", "none")),
        Arm("visual-only", ("--modality", "visual", "--modulation", "none")),
        Arm("concat", ("--fusion", "concat", "--modulation", "none")),
        Arm("concat+ogm-ge", ("--fusion", "concat", "--modulation", "ogm-ge")),
    ))
    baseline: str = "concat"           # the two arms the verdict compares
    treated: str = "concat+ogm-ge"


DEMO = DemoConfig()


def modulation_end(cfg: DemoConfig) -> int:
    """Last modulated epoch (0-based, inclusive): the first ``modulation_fraction`` of the epochs."""
    return max(0, math.ceil(cfg.epochs * cfg.modulation_fraction) - 1)


def _per_seed(runs: list[RunRecord], key: str) -> dict[int, float]:
    out = {}
    for r in runs:
        v = run_values(r)[key]
        if v is not None:
            out[int(r.config.get("seed", 0))] = float(v)
    return out


def verdict(base: list[RunRecord], treated: list[RunRecord], key: str) -> dict:
    """How ``treated`` compares with ``base`` on metric ``key`` over paired seeds.

    ``direction`` is "raised" when the mean rose and it rose in a majority of the seeds,
    "lowered" in the mirror case, "did not consistently change" otherwise (or with no data).
    Three seeds are no significance test; the sentence gives the counts so readers can judge."""
    b, t = _per_seed(base, key), _per_seed(treated, key)
    seeds = sorted(set(b) & set(t))
    if not seeds:
        return {"direction": "could not be compared", "seeds": 0}
    diffs = [t[s] - b[s] for s in seeds]
    up, down = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    mb, sb = mean_std(b[s] for s in seeds)
    mt, st = mean_std(t[s] for s in seeds)
    delta = mt - mb
    if delta > 0 and up > len(seeds) / 2:
        direction = "raised"
    elif delta < 0 and down > len(seeds) / 2:
        direction = "lowered"
    else:
        direction = "did not consistently change"
    return {"direction": direction, "seeds": len(seeds), "up": up, "down": down,
            "base": (mb, sb), "treated": (mt, st), "delta": delta}


def _sentence(what: str, v: dict, base_name: str, treated_name: str) -> str:
    if v["seeds"] == 0:
        return f"The {what} could not be compared (no seed has it for both {base_name} and {treated_name})."
    (mb, sb), (mt, st) = v["base"], v["treated"]
    return (f"OGM-GE **{v['direction']}** the {what}: {100 * mt:.1f} ± {100 * st:.1f}% with OGM-GE vs "
            f"{100 * mb:.1f} ± {100 * sb:.1f}% without ({100 * v['delta']:+.1f} points; higher in "
            f"{v['up']} and lower in {v['down']} of {v['seeds']} paired seeds).")


def conclusion(groups: dict[str, list[RunRecord]], cfg: DemoConfig = DEMO) -> str:
    """Markdown sentences on the visual probe and fused test accuracy, generated from the numbers."""
    base, treated = groups.get(cfg.baseline, []), groups.get(cfg.treated, [])
    lines = ["## Verdict", "",
             f"Comparing `{cfg.treated}` with `{cfg.baseline}` (same data, seeds and budget), "
             "seed by seed:", ""]
    for key, what in (("probe_v", "visual linear-probe accuracy"), ("acc", "fused test accuracy"),
                      ("probe_a", "audio linear-probe accuracy")):
        lines.append("- " + _sentence(what, verdict(base, treated, key), cfg.baseline, cfg.treated))
    lines += ["", "With this few seeds a difference smaller than the spread across seeds is not evidence "
              "either way."]
    return "\n".join(lines) + "\n"
