"""Can the loader feed a GPU? Samples/s the shard loader delivers vs samples/s a bf16 ResNet-18
pair (audio + visual encoders, concat head, forward + backward + SGD step) consumes.

    python -m bench.gpu_feed [--json] [--clips 256] [--batch-size 64] [--workers 1 4 8]

Two settings of the paper: CREMA-D (3 s ``paper`` spectrogram 257x299, 1 frame) and
Kinetics-Sounds (10 s spectrogram 257x1004, 3 frames), 224-px frames. Both sides are measured on
the same machine: the loader alone (batches moved to the GPU with ``data.to_device``, uint8
frames normalised there), and the model step alone on batches already on the GPU. The loader
keeps the GPU busy when its samples/s is at least the step's. Needs CUDA; without it the
script says so and exits 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

SETTINGS = {"cremad": {"dataset": "cremad", "frames": 1}, "kinetics-sounds": {"dataset": "kinetics-sounds",
                                                                                "frames": 3}}


def _extract(work: Path, dataset: str, clips: int) -> Path:
    from avprep.config import ExtractConfig, spec_preset
    from avprep.extract import extract
    from avprep.synth import make_dataset

    raw, out = work / f"raw-{dataset}", work / f"shards-{dataset}"
    make_dataset(dataset, raw, clips, size=(480, 360), fps=5, seed=0)
    extract(dataset, raw, out, ExtractConfig(spec_preset("paper", dataset), shard_size=max(8, clips // 4)))
    return out


def loader_rate(shards: Path, *, frames: int, batch_size: int, workers: int, batches: int, device) -> float:
    from ogmge_train.data import make_loader, to_device

    n = 0
    loader = make_loader(str(shards), "train", train=True, batch_size=batch_size, frames=frames, workers=workers,
                         visual_dtype=torch.uint8, pin_memory=True, persistent_workers=workers > 0)
    start = None
    for epoch in range(1000):
        loader.set_epoch(epoch)
        for batch in loader:
            audio, visual, label = to_device(batch, device)
            if start is None:       # worker start-up is not timed
                torch.cuda.synchronize()
                start = time.perf_counter()
                continue
            n += len(label)
            if n >= batches * batch_size:
                torch.cuda.synchronize()
                return n / (time.perf_counter() - start)
    raise RuntimeError("not enough batches")


def step_rate(num_classes: int, spec_shape, *, frames: int, batch_size: int, steps: int, device) -> float:
    from ogmge_train.models import build_model

    model = build_model("resnet18", "concat", num_classes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    audio = torch.randn(batch_size, 1, *spec_shape, device=device)
    visual = torch.randn(batch_size, frames, 3, 224, 224, device=device)
    label = torch.randint(0, num_classes, (batch_size,), device=device)
    for i in range(steps + 3):
        if i == 3:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(audio, visual)
            loss = torch.nn.functional.cross_entropy(out.logits.float(), label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--clips", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.gpu_feed needs CUDA; not run", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    res = {"gpu": torch.cuda.get_device_name(0), "batch_size": args.batch_size, "settings": {}}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-feed-") as tmp:
        for name in args.settings:
            s = SETTINGS[name]
            shards = _extract(Path(tmp), s["dataset"], args.clips)
            meta = json.loads((shards / "dataset.json").read_text())
            step = step_rate(len(meta["classes"]), meta["spec_shape"], frames=s["frames"],
                             batch_size=args.batch_size, steps=args.batches, device=device)
            feed = {w: loader_rate(shards, frames=s["frames"], batch_size=args.batch_size, workers=w,
                                   batches=args.batches, device=device) for w in args.workers}
            res["settings"][name] = {"spec_shape": meta["spec_shape"], "frames": s["frames"],
                                     "step_samples_per_s": step,
                                     "loader_samples_per_s": {str(w): r for w, r in feed.items()},
                                     "loader_over_step": {str(w): r / step for w, r in feed.items()}}
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        for name, r in res["settings"].items():
            print(f"{name}: step {r['step_samples_per_s']:.0f} samples/s; loader "
                  + ", ".join(f"{w} workers {v:.0f} ({r['loader_over_step'][w]:.2f}x)"
                              for w, v in r["loader_samples_per_s"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
