"""Extraction speed, measured side by side in one run on the same synthetic clips (CPU).

    python -m bench.extract [--dataset cremad|kinetics-sounds] [--clips N] [--reps R] [--json]

Variants, each timed over every clip of the dataset (real encoded media from avprep.synth,
by default at the real datasets' frame sizes and rates):

- ``floor``: PyAV decoding only what extraction must decode (the video packets the kept
  frames need: GOPs that end before the next kept frame are skipped, decoding stops at the
  last kept frame; the whole audio stream), with the same demux pass (``media._decode``), the
  same single-threaded decoder and the same frame choice, and nothing else: no conversion,
  resize, JPEG, resampling, STFT or writing. No extractor can beat it with the same decoder.
- ``avprep-1``, ``avprep-2``: ``avprep.extract`` with 1 and 2 workers (the whole call:
  discovery, pool of fresh workers, shards, manifests) on ~10 shards, into an empty folder.
  One-time costs of a command (importing the extractor, starting the forkserver that
  workers fork from) are paid in a warm-up and reported apart (``one_time_seconds``): they do not grow with
  the dataset.
- ``reference``: the published OGM-GE CREMA-D preprocessing, one clip after another:
  ``cv2.VideoCapture``, ``success, image = vid.read()`` for every frame, every ``fps``-th
  frame (``count % fps == 0``) written with ``cv2.imencode('.jpg', image)[1].tofile(path)``
  at the original resolution and OpenCV's default quality 95 (avprep resizes to a 256 short
  side: the reference encodes bigger JPEGs but skips the resize), then
  ``librosa.load(wav, sr=...)``, tile to the duration, clip, ``librosa.stft``,
  ``log(|S| + 1e-7)`` and ``np.save``. For MP4 sources the audio is first written to a WAV
  (the ``ffmpeg -i clip.mp4 clip.wav`` step of those scripts, here with PyAV), because
  librosa cannot read MP4 without an ffmpeg binary.

Every variant runs on one core: avprep's decoders are single-threaded (one process per core)
and so are the floor's; OpenCV's decoder gets ``CAP_PROP_N_THREADS=1`` (the script leaves the
count to OpenCV; one thread makes the ratio per core) and OpenCV is held to one thread
(extraction does not use torch, so nothing else has a thread pool). Each rep runs every variant once in a rotating order (load drift on a shared machine
hits all alike); the fastest rep of each variant is reported (the least disturbed one); the
load average before and after is in the output. Ratios: ``extract_over_floor`` = avprep-1
time / floor time (target <= 1.25), ``reference_over_extract`` = reference time / avprep-1
time, both single-process (target >= 3), ``speedup_2_workers`` = avprep-1 time / avprep-2
time (target >= 1.7 on >= 2 free cores).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from avprep import media, synth
from avprep.config import ExtractConfig, spec_preset
from avprep.datasets import get as get_adapter

DEFAULTS = {  # clips, (w, h), source fps: CREMA-D is 480x360 at 30 fps, Kinetics clips 10 s
    "cremad": (120, (480, 360), 30),   # enough clips that a pool's start-up is amortised
    "kinetics-sounds": (16, (340, 256), 25),
}


def make_data(dataset: str, clips: int, size: tuple[int, int], fps: int, root: Path) -> Path:
    """The synthetic raw dataset, cached across runs (same arguments, same bytes)."""
    src = root / f"{dataset}-{clips}-{size[0]}x{size[1]}-{fps}"
    if not (src / ".complete").exists():
        shutil.rmtree(src, ignore_errors=True)
        synth.make_dataset(dataset, src, clips, seed=0, size=size, fps=fps,
                           duration=None if dataset == "cremad" else 10.0)
        (src / ".complete").touch()
    return src


# ---------------------------------------------------------------- floor

class _DecodeOnly(media._FramePicker):
    """Decides which frames are kept exactly as extraction does, and converts none."""

    def _jpeg(self, frame) -> bytes:
        return b""


class _DropAudio:
    """Takes the decoded audio frames and does nothing with them: no resampling."""

    def __init__(self, sample_rate, path):
        self.seen = 0

    def feed(self, frame) -> None:
        self.seen += 1

    def finish(self) -> None:
        return None


def floor_clip(video: Path, audio: Path | None, fps: int, sample_rate: int = 16000) -> None:
    """Decode what extraction needs and drop it: the same demux pass and GOP skipping
    (``media._decode``), no conversion."""
    media._decode(video, None if audio else sample_rate, 1, dict(fps=fps, frame_size=0, jpeg_quality=0),
                  _DecodeOnly, _DropAudio)
    if audio:
        with media.open_media(audio) as c:
            for _ in c.decode(audio=0):
                pass


# ---------------------------------------------------------------- reference (OGM-GE style)

def reference_clip(video: Path, audio: Path | None, key: str, out: Path, cfg: ExtractConfig) -> None:
    """OGM-GE's ``video_preprocessing.py`` (videoReader.video2frame) and its audio step."""
    import cv2
    import librosa

    folder = out / key
    folder.mkdir(parents=True, exist_ok=True)
    vid = cv2.VideoCapture(str(video), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
    fps = int(vid.get(cv2.CAP_PROP_FPS))
    success, image = vid.read()
    count = 0
    while success:
        count += 1
        if count % fps == 0:
            cv2.imencode(".jpg", image)[1].tofile(str(folder / f"{count:05d}.jpg"))
        success, image = vid.read()
    vid.release()
    if audio is None:       # the scripts' ffmpeg step: the clip's audio as a WAV first
        audio = out / f"{key}.wav"
        _to_wav(video, audio)
    spec = cfg.spec
    samples, _ = librosa.load(str(audio), sr=spec.sample_rate)
    samples = np.tile(samples, math.ceil(spec.num_samples / len(samples)))[:spec.num_samples]
    samples[samples > 1.0] = 1.0
    samples[samples < -1.0] = -1.0
    stft = librosa.stft(samples, n_fft=spec.n_fft, hop_length=spec.hop_length,
                        win_length=spec.win_length, center=spec.center)
    np.save(out / f"{key}.npy", np.log(np.abs(stft) + 1e-7))


def _to_wav(video: Path, wav: Path) -> None:
    with av.open(str(video)) as src, av.open(str(wav), "w") as dst:
        ins = src.streams.audio[0]
        outs = dst.add_stream("pcm_s16le", rate=ins.rate, layout=ins.layout.name)
        for frame in src.decode(ins):
            frame.pts = None
            for packet in outs.encode(frame):
                dst.mux(packet)
        for packet in outs.encode(None):
            dst.mux(packet)


# ---------------------------------------------------------------- driver

def warm_up(clip, cfg: ExtractConfig, work: Path) -> dict[str, float]:
    """One-time costs, paid once per command and not per clip, timed apart: importing the
    extractor, starting the forkserver that pool workers fork from, first calls."""
    import concurrent.futures as cf

    t0 = time.perf_counter()
    import avprep.sample  # noqa: F401
    t1 = time.perf_counter()
    import cv2

    cv2.setNumThreads(1)            # one core per variant (see the module docstring)
    from avprep.extract import _mp_context
    with cf.ProcessPoolExecutor(2, mp_context=_mp_context()) as pool:
        list(pool.map(os.getpid, []))
        pool.submit(os.getpid).result()
    t2 = time.perf_counter()
    floor_clip(clip.video, clip.audio, cfg.fps)
    reference_clip(clip.video, clip.audio, clip.key, work / "warm", cfg)
    return {"import_extractor": round(t1 - t0, 3), "start_forkserver": round(t2 - t1, 3)}


def measure(dataset: str, src: Path, cfg: ExtractConfig, reps: int, work: Path, log):
    """(fastest seconds per variant, one-time costs)."""
    from avprep.extract import extract

    clips = get_adapter(dataset).discover(src).clips
    variants = {
        "floor": lambda: [floor_clip(c.video, c.audio, cfg.fps) for c in clips],
        "avprep-1": lambda: extract(dataset, src, work / "a1", cfg, workers=1, overwrite=True),
        "avprep-2": lambda: extract(dataset, src, work / "a2", cfg, workers=2, overwrite=True),
        "reference": lambda: [reference_clip(c.video, c.audio, c.key, work / "ref", cfg) for c in clips],
    }
    startup = warm_up(clips[0], cfg, work)
    for c in clips:     # page cache
        c.video.read_bytes()
    best = {name: math.inf for name in variants}
    names = list(variants)
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            for folder in ("ref", "a1", "a2"):      # every variant writes into an empty folder
                shutil.rmtree(work / folder, ignore_errors=True)
            t0 = time.perf_counter()
            variants[name]()
            best[name] = min(best[name], time.perf_counter() - t0)
            log(f"rep {rep + 1}/{reps} {name}: {time.perf_counter() - t0:.2f} s")
    return best, startup


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=sorted(DEFAULTS), default="cremad")
    ap.add_argument("--clips", type=int, help="number of clips [120 CREMA-D, 16 KS]")
    ap.add_argument("--size", help="source frame size WxH [480x360 CREMA-D, 340x256 KS]")
    ap.add_argument("--src-fps", type=int, help="source frame rate [30 CREMA-D, 25 KS]")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "avprep-bench",
                    help="cache folder for the synthetic clips")
    ap.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    args = ap.parse_args(argv)
    clips, size, fps = DEFAULTS[args.dataset]
    clips = args.clips or clips
    size = tuple(map(int, args.size.lower().split("x"))) if args.size else size
    fps = args.src_fps or fps
    log = (lambda m: print(m, file=sys.stderr, flush=True))

    log(f"synthetic {args.dataset}: {clips} clips {size[0]}x{size[1]} at {fps} fps in {args.data}")
    src = make_data(args.dataset, clips, size, fps, args.data)
    # ~10 shards, so two workers can share the work (real datasets have hundreds)
    cfg = ExtractConfig(spec=spec_preset("paper", args.dataset), shard_size=max(1, clips // 10))
    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="avprep-bench-") as work:
        t, startup = measure(args.dataset, src, cfg, args.reps, Path(work), log)
    result = {
        "dataset": args.dataset, "clips": clips, "source": f"{size[0]}x{size[1]} @ {fps} fps",
        "options": f"paper preset, 1 fps, frame size 256, JPEG 90, float16, shard size {cfg.shard_size}",
        "reps": args.reps, "one_time_seconds": startup,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_1min": {"before": load_before, "after": _load()},
        "seconds": {k: round(v, 3) for k, v in t.items()},
        "clips_per_s": {k: round(clips / v, 2) for k, v in t.items()},
        "clips_per_s_per_worker": {"avprep-1": round(clips / t["avprep-1"], 2),
                                   "avprep-2": round(clips / t["avprep-2"] / 2, 2)},
        "ratios": {"extract_over_floor": round(t["avprep-1"] / t["floor"], 3),
                   "reference_over_extract": round(t["reference"] / t["avprep-1"], 3),
                   "speedup_2_workers": round(t["avprep-1"] / t["avprep-2"], 3)},
        "targets": {"extract_over_floor": "<= 1.25", "reference_over_extract": ">= 3",
                    "speedup_2_workers": ">= 1.7"},
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for k in ("seconds", "clips_per_s", "clips_per_s_per_worker", "ratios"):
            print(f"{k}: " + ", ".join(f"{n}={v}" for n, v in result[k].items()))
        print("targets: " + ", ".join(f"{n} {v}" for n, v in result["targets"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
