"""Training-batch loading: our shard loader vs the per-clip file layout of the published OGM-GE code.

    python -m bench.loader [--json] [--clips 192] [--workers 2] [--batch-size 16] [--rounds 5]

One run builds both layouts from the same clips and measures them side by side:

- ``shards``: ``avprep extract`` output with the defaults (float16 spectrogram, JPEG frames with
  a 256-px short side, WebDataset tars), read by ``ogmge_train.data.make_loader`` with uint8
  frames (normalised on the training device by ``data.to_device``);
- ``reference``: what the published preprocessing scripts write and the published
  ``CramedDataset`` reads: one ``.npy`` per clip saved with ``np.save`` (float32, the same
  spectrogram values as the shard's) and one folder of JPEG frames per clip at the original
  video resolution (decoded at the same times, same JPEG quality), read by a torch ``Dataset``
  that opens the files of one sample per ``__getitem__`` with PIL, under a ``DataLoader``.

Throughput is measured with the files in the page cache ("warm", the headline figure) and
after evicting exactly these files from it ("cold", as when a dataset does not fit in RAM).
Both apply the same training transforms (``ogmge_train.transforms``: segment frame sampling,
RandomResizedCrop + flip, normalisation), batch size and worker count. Rounds alternate
between the two loaders (load drift on a shared machine hits both) and the median
samples/s is reported; the first batch of a round (worker start-up) is not timed. A round is at
most one training epoch (no sample read twice). The clips are synthetic CREMA-D clips at
CREMA-D's real frame size (480x360). A second figure reads the same clips extracted into one
train shard and into several, with 1 rank × 4 workers: samples, not shards, are partitioned, so
one shard should feed 4 workers as fast as several do.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import sys
import tarfile
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CREMAD_SIZE = (480, 360)


# ----------------------------------------------------------------------------- the reference

class ReferenceClips(torch.utils.data.Dataset):
    """The published ``CramedDataset`` pattern: a CSV of clips, per clip one ``.npy`` and one
    frame folder, opened on every ``__getitem__`` (PIL for frames)."""

    def __init__(self, root: Path, split: str, *, frames: int, image_size: int, train: bool):
        self.root, self.frames, self.image_size, self.train = Path(root), frames, image_size, train
        rows = (ln.split(",") for ln in (self.root / f"{split}.csv").read_text().splitlines() if ln)
        self.items = [(key, int(label)) for key, label in rows]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        from ogmge_train.transforms import select_frames, transform_clip

        key, label = self.items[i]
        rng = random    # the global RNG, as torchvision transforms use (DataLoader seeds it per worker)
        spec = np.load(self.root / "audio" / f"{key}.npy")
        folder = self.root / "visual" / key
        names = sorted(os.listdir(folder))
        images = [Image.open(folder / names[j]).convert("RGB")
                  for j in select_frames(len(names), self.frames, self.train, rng)]
        visual = transform_clip(images, train=self.train, image_size=self.image_size, rng=rng)
        return {"audio": torch.from_numpy(spec)[None], "visual": visual, "label": label, "key": key}


def reference_loader(root: Path, split: str, *, batch_size: int, frames: int, image_size: int,
                     workers: int, batches: int, seed: int = 0):
    ds = ReferenceClips(root, split, frames=frames, image_size=image_size, train=True)
    sampler = torch.utils.data.RandomSampler(ds, num_samples=batches * batch_size,
                                             generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                       drop_last=True)


def build_reference(shards: Path, raw: Path, ref: Path) -> int:
    """Write the reference layout from the extracted shards (spectrograms, labels, keys) and the
    raw videos (frames at the original resolution); returns the number of clips."""
    from avprep.media import decode_frames

    meta = json.loads((shards / "dataset.json").read_text())
    n = 0
    for split in meta["splits"]:
        manifest = json.loads((shards / f"{split}.manifest.json").read_text())
        lines = []
        for shard in manifest["shards"]:
            with tarfile.open(shards / shard["name"]) as tar:
                members = {m.name: m for m in tar.getmembers()}
                keys = sorted({name.split(".", 1)[0] for name in members})
                for key in keys:
                    info = json.loads(tar.extractfile(members[f"{key}.json"]).read())
                    spec = np.load(io.BytesIO(tar.extractfile(members[f"{key}.spec.npy"]).read()))
                    (ref / "audio").mkdir(parents=True, exist_ok=True)
                    np.save(ref / "audio" / f"{key}.npy", spec.astype(np.float32))
                    frames, _ = decode_frames(raw / info["source"], fps=info["fps"], frame_size=0,
                                              jpeg_quality=meta["config"]["jpeg_quality"])
                    folder = ref / "visual" / key
                    folder.mkdir(parents=True, exist_ok=True)
                    for i, jpg in enumerate(frames):
                        (folder / f"frame_{i:05d}.jpg").write_bytes(jpg)
                    lines.append(f"{key},{info['label_index']}")
                    n += 1
        (ref / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return n


def _bytes(paths) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of files."""
    apparent = allocated = 0
    for p in paths:
        st = p.stat()
        apparent += st.st_size
        allocated += getattr(st, "st_blocks", 0) * 512
    return apparent, allocated


# ----------------------------------------------------------------------------- measuring

def _evict(files) -> None:
    """Drop these files' pages from the OS cache (cold-cache reads, as for a dataset larger than RAM);
    touches only our own files, unlike dropping every cache."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _rate(loader) -> float:
    from ogmge_train.data import benchmark_loader
    return benchmark_loader(loader, warmup=1)["samples_per_s"]


def run(work: Path, *, clips: int, workers: int, batch_size: int, batches: int, rounds: int,
        frames: int, image_size: int, log=lambda msg: None) -> dict:
    from avprep.config import ExtractConfig, spec_preset
    from avprep.extract import extract
    from avprep.synth import make_dataset
    from ogmge_train.data import make_loader

    raw, shards, ref = work / "raw", work / "shards", work / "reference"
    log(f"synthesizing {clips} CREMA-D clips at {CREMAD_SIZE[0]}x{CREMAD_SIZE[1]}")
    make_dataset("cremad", raw, clips, size=CREMAD_SIZE, fps=5, seed=0)
    log("extracting shards (avprep defaults)")
    cfg = ExtractConfig(spec_preset("paper", "cremad"), shard_size=max(8, clips // 5))    # >= 4 train shards
    result = extract("cremad", raw, shards, cfg, workers=workers or 1)
    log("writing the reference layout")
    n = build_reference(shards, raw, ref)
    if n != result.num_samples:
        raise RuntimeError(f"reference has {n} clips, shards {result.num_samples}")

    shard_files = [shards / s["name"] for split in json.loads((shards / "dataset.json").read_text())["splits"]
                   for s in json.loads((shards / f"{split}.manifest.json").read_text())["shards"]]
    ref_files = [p for p in (ref / "audio").iterdir()] + [p for p in (ref / "visual").rglob("*.jpg")]
    ours_b, ours_alloc = _bytes(shard_files)
    ref_b, ref_alloc = _bytes(ref_files)

    log("extracting the same clips into one shard per split (for the 1-shard × 4-workers figure)")
    one = work / "one-shard"
    extract("cremad", raw, one, replace(cfg, shard_size=10**6), workers=workers or 1)
    train_n = json.loads((shards / "train.manifest.json").read_text())["num_samples"]
    batches = min(batches, train_n // batch_size)     # one epoch at most: no sample twice
    kw = dict(batch_size=batch_size, frames=frames, image_size=image_size, workers=workers)
    rates = {(who, cache): [] for who in ("shards", "reference") for cache in ("warm", "cold")}
    # uint8 frames: the batch is normalised on the training device (data.to_device), as train.py does on GPU
    loaders = {
        "shards": lambda r: make_loader(str(shards), "train", train=True, seed=r, steps_per_epoch=batches,
                                        shuffle_buffer=batch_size * 4, visual_dtype=torch.uint8, **kw),
        "reference": lambda r: reference_loader(ref, "train", batches=batches, seed=r, **kw),
    }
    scaling = {"one_shard": [], "four_shards": []}
    n_shards = len(json.loads((shards / "train.manifest.json").read_text())["shards"])
    files = {"shards": shard_files, "reference": ref_files}
    load_before = os.getloadavg()[0]    # context for the figures on a shared machine
    for r in range(rounds):
        log(f"round {r + 1}/{rounds}")
        order = ("shards", "reference") if r % 2 == 0 else ("reference", "shards")   # who goes first alternates
        for cache in ("warm", "cold"):
            for who in order:
                if cache == "cold":
                    _evict(files[who])
                rates[who, cache].append(_rate(loaders[who](r)))
        for name, folder in (("one_shard", one), ("four_shards", shards))[::1 if r % 2 == 0 else -1]:
            scaling[name].append(_rate(make_loader(str(folder), "train", train=True, seed=r, steps_per_epoch=batches,
                                                   shuffle_buffer=batch_size * 4, visual_dtype=torch.uint8,
                                                   **{**kw, "workers": 4})))
    med = {k: statistics.median(v) for k, v in rates.items()}
    one_rate, four_rate = statistics.median(scaling["one_shard"]), statistics.median(scaling["four_shards"])
    ours_rate, ref_rate = med["shards", "warm"], med["reference", "warm"]
    return {
        "clips": n, "frame_size_original": f"{CREMAD_SIZE[0]}x{CREMAD_SIZE[1]}", "workers": workers,
        "batch_size": batch_size, "batches_per_round": batches, "rounds": rounds, "frames": frames,
        "image_size": image_size,
        "shards_samples_per_s": ours_rate, "reference_samples_per_s": ref_rate,
        "throughput_ratio": ours_rate / ref_rate,
        "shards_bytes_per_sample": ours_b / n, "reference_bytes_per_sample": ref_b / n,
        "bytes_ratio": ours_b / ref_b,
        "shards_allocated_bytes_per_sample": ours_alloc / n,
        "reference_allocated_bytes_per_sample": ref_alloc / n,
        "cold_cache_shards_samples_per_s": med["shards", "cold"],
        "cold_cache_reference_samples_per_s": med["reference", "cold"],
        "cold_cache_throughput_ratio": med["shards", "cold"] / med["reference", "cold"],
        "rounds_samples_per_s": {f"{who}_{cache}": v for (who, cache), v in rates.items()},
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "one_shard_4_workers_samples_per_s": one_rate,
        f"{n_shards}_shards_4_workers_samples_per_s": four_rate,
        "one_shard_vs_many_ratio": one_rate / four_rate,
        "targets": {"throughput_ratio": ">= 1.5", "bytes_ratio": "<= 0.6", "one_shard_vs_many_ratio": ">= 0.9"},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Shard loader vs per-clip files: samples/s and bytes/sample.")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    ap.add_argument("--clips", type=int, default=192)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batches", type=int, default=16, help="timed batches per round (+1 warm-up)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--frames", type=int, default=1, help="frames per clip (CREMA-D: 1)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--keep", type=Path, help="build the data here and keep it (default: a temp folder)")
    args = ap.parse_args(argv)
    def log(msg):
        print(msg, file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        res = run(work, clips=args.clips, workers=args.workers, batch_size=args.batch_size,
                  batches=args.batches + 1, rounds=args.rounds, frames=args.frames,
                  image_size=args.image_size, log=log)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"{res['clips']} clips, batch {res['batch_size']}, {res['workers']} workers, "
              f"{res['frames']} frame(s) at {res['image_size']}px")
        print(f"samples/s       shards {res['shards_samples_per_s']:8.1f}   reference "
              f"{res['reference_samples_per_s']:8.1f}   ratio {res['throughput_ratio']:.2f}x (target >= 1.5x)")
        print(f"cold cache      shards {res['cold_cache_shards_samples_per_s']:8.1f}   reference "
              f"{res['cold_cache_reference_samples_per_s']:8.1f}   ratio {res['cold_cache_throughput_ratio']:.2f}x")
        print(f"load average    {res['load_average_1min']['before']:.2f} before, "
              f"{res['load_average_1min']['after']:.2f} after (other processes skew both loaders)")
        print(f"1 rank x 4 workers: 1 shard {res['one_shard_4_workers_samples_per_s']:8.1f}   several shards "
              f"{[v for k, v in res.items() if k.endswith('_shards_4_workers_samples_per_s')][0]:8.1f}   ratio "
              f"{res['one_shard_vs_many_ratio']:.2f}x (target >= 0.9x)")
        print(f"bytes/sample    shards {res['shards_bytes_per_sample']:8.0f}   reference "
              f"{res['reference_bytes_per_sample']:8.0f}   ratio {res['bytes_ratio']:.2f}x (target <= 0.6x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
