"""Run every benchmark and write BENCHMARKS.md: ``python -m bench.run_all --out BENCHMARKS.md``.

Each benchmark runs as its own process (``python -m bench.<name> --json``), so one that fails
does not stop the others and none shares warm caches or imported state with another; its
JSON document (stdout) is rendered as a table, its failure as the error it printed.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# (section key, module under bench/, its arguments, title)
BENCHES = (
    ("extract-cremad", "extract", ["--kind", "cremad"],
     "Extraction, CREMA-D-like FLV + WAV: avprep vs the decode floor and the published preprocessing"),
    ("extract-textured", "extract", ["--kind", "textured"],
     "Extraction, 10 s textured H.264 + 44.1 kHz stereo AAC"),
    ("extract-flat", "extract", ["--kind", "flat"],
     "Extraction, 10 s flat (cheap to decode) H.264 + 44.1 kHz stereo AAC"),
    ("extract-x264-bframes", "extract", ["--kind", "x264-bframes"],
     "Extraction, 10 s x264 -preset medium (B-frames) + 44.1 kHz stereo AAC"),
    ("ogm_overhead", "ogm_overhead", [], "OGM-GE overhead per training step"),
    ("loader", "loader", [], "Training-batch loading: shards vs per-clip files"),
)
# the cost model: VGGSound-sized corpus of 10 s clips, nodes of 64 cores
COST_CLIPS, COST_CORES, COST_NODES = 200_000, 64, (1, 4, 16)


def machine() -> dict:
    """CPU model, core count, OS and versions: what the figures depend on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "os": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            # other work on the machine skews absolute rates (ratios less so)
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def run_bench(name: str, args: list[str], timeout: float) -> dict:
    """``{"ok", "result"|"error", "seconds", "command"}`` of one ``python -m bench.<name> --json``."""
    cmd = [sys.executable, "-m", f"bench.{name}", "--json", *args]
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "seconds": timeout,
                "command": " ".join(cmd[1:])}
    out = {"seconds": time.monotonic() - t0, "command": "python " + " ".join(cmd[1:])}
    if p.returncode == 0:
        try:
            return {**out, "ok": True, "result": json.loads(p.stdout)}
        except ValueError:
            pass
    tail = (p.stderr.strip().splitlines() or p.stdout.strip().splitlines() or ["no output"])[-1]
    return {**out, "ok": False, "error": f"exit {p.returncode}: {tail}"}


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, (dict, list)):
        return "`" + json.dumps(v, sort_keys=True) + "`"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and len(json.dumps(v)) > 80:
            rows.extend(_flatten(v, key + "."))
        else:
            rows.append((key, v))
    return rows


def _lookup(d: dict, dotted: str):
    """``d["a"]["b"]`` for "a.b" (keys may contain dashes, not dots); None when absent."""
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _summary(results: dict[str, dict]) -> list[str]:
    """Every figure that has a target, beside it (a bench's JSON names targets under "targets")."""
    rows = []
    for key, *_ in BENCHES:
        r = results[key].get("result") or {}
        for figure, target in (r.get("targets") or {}).items():
            value = _lookup(r, figure)
            if value is None:
                value = _lookup(r.get("ratios") or {}, figure)
            rows.append(f"| {key} | {figure} | {_cell(value)} | {target} |")
    if not rows:
        return []
    return ["## Summary", "", "| bench | figure | measured | target |", "|---|---|---|---|", *rows, ""]


def _cost_model(results: dict[str, dict]) -> list[str]:
    """Measured seconds per clip per core (one worker) -> projected wall time for a VGGSound-sized
    corpus, scaled by the measured 2-worker parallel efficiency (capped at 1)."""
    rows = []
    for key, *_ in BENCHES:
        r = results[key].get("result") or {}
        if not key.startswith("extract-") or "seconds_per_clip_core" not in r or r.get("kind") == "cremad":
            continue
        per_clip = r["seconds_per_clip_core"]
        assemble = r.get("assembler_seconds_per_clip", 0.0)
        efficiency = min(1.0, r["ratios"]["speedup_2_workers"] / 2)
        driver = COST_CLIPS * assemble / 3600
        one_node = max(driver, COST_CLIPS * per_clip / (COST_CORES * efficiency) / 3600)
        # Ray: shard builders are tasks too, so their work spreads over the cluster
        ray = [COST_CLIPS * (per_clip + assemble) / (COST_CORES * n * efficiency) / 3600 for n in COST_NODES]
        rows.append(f"| {r['kind']} | {per_clip:.3g} | {assemble * 1e3:.2g} ms | {efficiency:.2f} | "
                    f"{driver:.2g} h | {one_node:.2g} h | " + " | ".join(f"{h:.2g} h" for h in ray) + " |")
    if not rows:
        return []
    return ["## Cost model", "",
            f"Projected wall time to extract {COST_CLIPS:,} ten-second clips (VGGSound's size) with the "
            f"`paper` preset: measured seconds per clip on one core (`avprep-1`), divided by "
            f"{COST_CORES} cores per node and by the measured 2-worker parallel efficiency. One node is "
            "`--engine local --workers 64`: its shards are written by the extracting process (one "
            "write and one sha256 update per sample, `assembler_seconds_per_clip`), so that node's "
            "wall time is at least clips x that cost (the driver bound). A Ray cluster (`--engine ray "
            "--ray-address auto`) writes each shard in a task on the cluster, so that cost is spread "
            "over the nodes like the clips themselves and the driver only receives shard states; "
            "moving samples between nodes (Ray's object transfer to the shard's builder) and the "
            "upload are not measured here. Raw videos are assumed on local or fast shared storage.", "",
            "| content | s / clip / core | assembling / clip | 2-worker efficiency | driver bound | "
            f"1 node, local ({COST_CORES} cores) | "
            + " | ".join(f"Ray, {n} node{'s' if n > 1 else ''} ({n * COST_CORES} cores)" for n in COST_NODES) + " |",
            "|---|---|---|---|---|---|" + "---|" * len(COST_NODES), *rows, ""]


def render(results: dict[str, dict], info: dict, command: str, when: str) -> str:
    """BENCHMARKS.md: one section per benchmark, every figure its JSON reported."""
    lines = ["# Benchmarks", "",
             f"Measured {when} on {info['cpu']} ({info['cores']} cores, {info['usable_cores']} usable), "
             f"{info['os']}, Python {info['python']}, torch {info['torch']}; 1-minute load average "
             f"{info['load_average_1min']} when the report was written.", "",
             f"Command: `{command}`", "",
             "Every ratio below is measured side by side in one process run on the same input, "
             "so it is comparable across machines even where absolute rates are not.", ""]
    lines += _summary(results)
    lines += _cost_model(results)
    for key, module, _args, title in BENCHES:
        r = results[key]
        lines += [f"## {title} (`bench/{module}.py`)", "", f"`{r['command']}` ({r['seconds']:.0f} s)", ""]
        if not r["ok"]:
            lines += [f"**Failed:** {r['error']}", ""]
            continue
        lines += ["| figure | value |", "|---|---|"]
        lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in _flatten(r["result"])]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark")
    ap.add_argument("--only", action="append", choices=[b[0] for b in BENCHES],
                    help="run only this benchmark (repeatable)")
    args = ap.parse_args(argv)
    names = args.only or [b[0] for b in BENCHES]
    results = {}
    for key, module, bench_args, _title in BENCHES:
        if key not in names:
            results[key] = {"ok": False, "error": "not run (--only)", "seconds": 0,
                            "command": f"python -m bench.{module} --json"}
            continue
        print(f"{key} ...", file=sys.stderr, flush=True)
        results[key] = run_bench(module, bench_args, args.timeout)
        status = "ok" if results[key]["ok"] else results[key]["error"]
        print(f"{key}: {status} ({results[key]['seconds']:.0f} s)", file=sys.stderr, flush=True)
    command = "python -m bench.run_all " + " ".join(argv if argv is not None else sys.argv[1:])
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    Path(args.out).write_text(render(results, machine(), command.strip(), when))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0 if all(r["ok"] for n, r in results.items() if n in names) else 1


if __name__ == "__main__":
    sys.exit(main())
