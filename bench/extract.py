"""Extraction speed, measured side by side in one run on the same synthetic clips (CPU).

    python -m bench.extract [--kind textured|flat|x264-bframes|cremad] [--clips N] [--reps R] [--json]

Content kinds (real encoded media, cached under ``--data``):

- ``textured``: 10 s 340x256 25-fps H.264 (x264 ultrafast, CRF 18) of moving noise texture,
  expensive to decode, with 44.1 kHz stereo AAC;
- ``flat``: the same container and codec over flat colour with a small moving square
  (cheap to decode: the audio path dominates), with 44.1 kHz stereo AAC;
- ``x264-bframes``: textured content encoded with x264 ``-preset medium`` (CRF 23, B-frames,
  b-pyramid, 250-frame GOPs: a 10 s clip is one GOP), with 44.1 kHz stereo AAC;
- ``cremad``: CREMA-D-like FLV (480x360, 30 fps, Sorenson H.263 + MP3) plus a 16 kHz WAV.

Variants, each timed over every clip:

- ``floor``: PyAV decoding only what extraction must decode (the video packets the kept
  frames need, the whole audio stream; a plain PCM WAV is read with ``media.read_pcm_wav``
  as extraction does), with the same demux pass (``media.clip._decode``), the same
  single-threaded decoder and the same frame choice, and nothing else: no conversion,
  resize, JPEG, resampling, STFT or writing. No extractor can beat it with the same decoder.
- ``convert``: the floor plus the conversions the output cannot do without, with the same
  libraries and calls extraction uses: each kept frame resized and JPEG-encoded (one swscale
  call, libjpeg-turbo), the audio downmixed and resampled (soxr), the spectrogram (numpy FFT),
  i.e. ``media.decode_clip`` + ``spectrogram.compute``, with no metadata, no tar, no writing
  and no task machinery. ``convert_over_floor`` is the ceiling for ``extract_over_floor``:
  where it exceeds 1.25 that target cannot be met with these decoders and encoders, and
  ``extract_over_convert`` (what extraction adds on top: metadata, .npy, tar encoding,
  writing, hashing, manifests, orchestration) is held to 1.25 instead.
- ``avprep-1``: ``avprep.extract`` with the serial engine (the whole call: discovery,
  shards, manifests), into an empty folder; ``avprep-2``: the local engine with 2 workers.
  The folder kinds are one split in one shard, so ``avprep-2`` measures the clip-level work
  split (CREMA-D: one shard per split). One-time costs of a command (importing the
  extractor, starting the forkserver) are paid in a warm-up and reported apart.
- ``reference``: the published OGM-GE preprocessing, one clip after another:
  ``cv2.VideoCapture``, ``success, image = vid.read()`` for every frame, every ``fps``-th
  frame (``count % fps == 0``) written with ``cv2.imencode('.jpg', image)[1].tofile(path)``
  at the original resolution and OpenCV's default quality 95, then
  ``librosa.load(wav, sr=...)``, tile to the duration, clip, ``librosa.stft``,
  ``log(|S| + 1e-7)`` and ``np.save``. For MP4 sources the audio is first written to a WAV
  (the ``ffmpeg -i clip.mp4 clip.wav`` step of those scripts, here with PyAV), because
  librosa cannot read MP4 without an ffmpeg binary.

Every variant but ``avprep-2`` runs on one core (OpenCV held to one thread), and all run
with the heap kept as extraction keeps it in its processes (``engines.keep_heap``). Each rep runs
every variant once in a rotating order (load drift on a shared machine hits all alike); the
fastest rep of each variant is reported; the load average before and after is in the output.
Ratios: ``extract_over_floor`` = avprep-1 / floor (target <= 1.25 where the ceiling
``convert_over_floor`` allows it, else ``extract_over_convert`` <= 1.25), ``reference_over_extract``
= reference / avprep-1 (target >= 3 where ``reference_over_floor``, the ceiling any extractor
with this decoder has, allows it), ``speedup_2_workers`` = avprep-1 / avprep-2 (target >= 1.8
on 2 free cores). ``seconds_per_clip_core`` (avprep-1 time per clip) and
``assembler_seconds_per_clip`` (the parent's share: writing a sample into a shard) feed the
cost model in BENCHMARKS.md.
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

# clips, (w, h), source fps. Each kind is ~2-4 s of one-worker extraction: long enough that
# what a run pays once (starting the worker pool, each worker's first clip: ~40 ms) is small
# beside the per-clip work the worker ratio is about, as it is on a real dataset.
KINDS = {
    "textured": (24, (340, 256), 25),
    "flat": (96, (340, 256), 25),
    "x264-bframes": (24, (340, 256), 25),
    "cremad": (480, (480, 360), 30),   # CREMA-D is 480x360 at 30 fps, 2-4 s
}
_X264 = {"textured": {"preset": "ultrafast", "crf": "18"}, "flat": {"preset": "ultrafast", "crf": "18"},
         "x264-bframes": {"preset": "medium", "crf": "23"}}


def write_kind_clip(path: Path, kind: str, size: tuple[int, int], fps: int, seed: int,
                    duration: float = 10.0, rate: int = 44100) -> None:
    """One 10 s MP4 of ``kind`` with 44.1 kHz stereo AAC (tone + noise)."""
    rng = np.random.default_rng(seed)
    w, h = size
    texture = rng.integers(0, 256, (h + 64, w + 64, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=fps)
        v.width, v.height, v.pix_fmt = w, h, "yuv420p"
        v.options = {**_X264[kind], "threads": "1"}
        a = out.add_stream("aac", rate=rate, layout="stereo")
        for i in range(int(duration * fps)):
            if kind == "flat":
                img = np.full((h, w, 3), (40 + seed * 13) % 200, np.uint8)
                x = (i * 3) % (w - 16)
                img[h // 2 - 8:h // 2 + 8, x:x + 16] = 230
            else:
                dx, dy = (i * 2) % 64, (i * 3) % 64
                img = texture[dy:dy + h, dx:dx + w].copy()
                img[:, :, 0] = img[:, :, 0] // 2 + (i * 5) % 128
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            out.mux(v.encode(frame))
        out.mux(v.encode(None))
        n = int(duration * rate)
        t = np.arange(n) / rate
        tone = 0.3 * np.sin(2 * np.pi * (300 + 50 * seed) * t)
        wave = np.stack([tone + 0.05 * rng.standard_normal(n), 0.5 * tone + 0.05 * rng.standard_normal(n)])
        wave = wave.astype(np.float32)
        for start in range(0, n, 1024):
            chunk = np.ascontiguousarray(wave[:, start:start + 1024])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
            frame.sample_rate, frame.pts = rate, start
            out.mux(a.encode(frame))
        out.mux(a.encode(None))


def make_data(kind: str, clips: int, size: tuple[int, int], fps: int, root: Path) -> tuple[str, Path]:
    """(dataset adapter, raw folder) of ``kind``, cached across runs. Folder kinds are laid out
    ``test/<class>/<clip>.mp4``: one split, hence one shard."""
    src = root / f"{kind}-{clips}-{size[0]}x{size[1]}-{fps}"
    dataset = "cremad" if kind == "cremad" else "folder"
    if not (src / ".complete").exists():
        shutil.rmtree(src, ignore_errors=True)
        if kind == "cremad":
            synth.make_dataset("cremad", src, clips, seed=0, size=size, fps=fps, duration=None)
        else:
            for n in range(clips):
                write_kind_clip(src / "test" / f"class{n % 2}" / f"clip{n:03d}.mp4", kind, size, fps, n)
        (src / ".complete").touch()
    return dataset, src


# ---------------------------------------------------------------- floor

class _DecodeOnly(media.video._FramePicker):
    """Decides which frames are kept exactly as extraction does, and converts none."""

    def _jpeg(self, frame) -> bytes:
        return b""


class _DropAudio:
    """Takes the decoded audio frames and does nothing with them: no resampling."""

    def __init__(self, *args):
        self.seen = 0

    def feed(self, frame) -> None:
        self.seen += 1

    def finish(self) -> None:
        return None


def floor_clip(video: Path, audio: Path | None, fps: int, sample_rate: int = 16000) -> None:
    """Decode what extraction needs and drop it: the same demux pass and GOP skipping
    (``media.clip._decode``), no conversion."""
    media.clip._decode(video, None if audio else sample_rate, 1, dict(fps=fps, frame_size=0, jpeg_quality=0),
                  _DecodeOnly, _DropAudio)
    if audio and media.read_pcm_wav(audio) is None:   # a plain WAV is read, not decoded
        with media.open_media(audio) as c:
            for _ in c.decode(audio=0):
                pass


def convert_clip(video: Path, audio: Path | None, cfg: ExtractConfig) -> None:
    """Decode and make the output's pixels and spectrogram, nothing else (``convert``)."""
    from avprep import spectrogram
    clip = media.decode_clip(video, audio, sample_rate=cfg.spec.sample_rate, fps=cfg.fps,
                             frame_size=cfg.frame_size, jpeg_quality=cfg.jpeg_quality, threads=1,
                             resampler=cfg.spec.resampler, frame_rule=cfg.frame_rule)
    spectrogram.compute(media.fit_duration(clip.wave, cfg.spec.num_samples), cfg.spec)


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
    from avprep.engines import _mp_context
    with cf.ProcessPoolExecutor(2, mp_context=_mp_context()) as pool:
        list(pool.map(os.getpid, []))
        pool.submit(os.getpid).result()
    t2 = time.perf_counter()
    floor_clip(clip.video, clip.audio, cfg.fps)
    convert_clip(clip.video, clip.audio, cfg)
    reference_clip(clip.video, clip.audio, clip.key, work / "warm", cfg)
    return {"import_extractor": round(t1 - t0, 3), "start_forkserver": round(t2 - t1, 3)}


def measure(dataset: str, src: Path, cfg: ExtractConfig, reps: int, work: Path, log):
    """(fastest seconds per variant, one-time costs)."""
    from avprep.engines import keep_heap
    from avprep.extract import extract

    clips = get_adapter(dataset).discover(src).clips
    variants = {
        "floor": lambda: [floor_clip(c.video, c.audio, cfg.fps) for c in clips],
        "convert": lambda: [convert_clip(c.video, c.audio, cfg) for c in clips],
        "avprep-1": lambda: extract(dataset, src, work / "a1", cfg, engine="serial", overwrite=True),
        "avprep-2": lambda: extract(dataset, src, work / "a2", cfg, engine="local", workers=2,
                                    overwrite=True),
        "reference": lambda: [reference_clip(c.video, c.audio, c.key, work / "ref", cfg) for c in clips],
    }
    keep_heap()         # what extraction does in its processes: every variant gets it
    startup = warm_up(clips[0], cfg, work)
    for c in clips:     # page cache
        c.video.read_bytes()
    best = {name: math.inf for name in variants}
    cpu = {name: math.inf for name in variants}     # CPU seconds (this process and its children)
    names = list(variants)
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            for folder in ("ref", "a1", "a2"):      # every variant writes into an empty folder
                shutil.rmtree(work / folder, ignore_errors=True)
            t0, c0 = time.perf_counter(), _cpu()
            variants[name]()
            best[name] = min(best[name], time.perf_counter() - t0)
            cpu[name] = min(cpu[name], _cpu() - c0)
            log(f"rep {rep + 1}/{reps} {name}: {time.perf_counter() - t0:.2f} s")
    return best, cpu, startup


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def assembler_seconds_per_clip(dataset: str, src: Path, cfg: ExtractConfig, work: Path, n: int = 200) -> float:
    """What the parent (the assembler) spends per clip: one real sample, encoded as workers
    encode it, appended ``n`` times to a shard (one write, one sha256 update, one fsync at the
    end), no decoding and no encoding."""
    from avprep.sample import extract_clip
    from avprep.shards import EncodedSample, ShardWriter, encode_sample

    disc = get_adapter(dataset).discover(src)
    clip = disc.clips[0]
    data = encode_sample("k", extract_clip(clip, disc.classes.index(clip.label), clip.split, cfg, src)).data
    samples = [EncodedSample(f"k{i:06d}", data, 0) for i in range(n)]
    t0 = time.perf_counter()
    with ShardWriter(work / "assembler.tar") as writer:
        for sample in samples:
            writer.add_encoded(sample)
        writer.commit()
    return (time.perf_counter() - t0) / n


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=list(KINDS), default="cremad")
    ap.add_argument("--dataset", choices=["cremad", "kinetics-sounds"],
                    help="old spelling: cremad, or kinetics-sounds for --kind textured")
    ap.add_argument("--clips", type=int, help="number of clips [see KINDS]")
    ap.add_argument("--size", help="source frame size WxH [480x360 CREMA-D, 340x256 others]")
    ap.add_argument("--src-fps", type=int, help="source frame rate [30 CREMA-D, 25 others]")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "avprep-bench",
                    help="cache folder for the synthetic clips")
    ap.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    args = ap.parse_args(argv)
    kind = {"kinetics-sounds": "textured", "cremad": "cremad"}.get(args.dataset, args.kind)
    clips, size, fps = KINDS[kind]
    clips = args.clips or clips
    size = tuple(map(int, args.size.lower().split("x"))) if args.size else size
    fps = args.src_fps or fps
    def log(m):
        print(m, file=sys.stderr, flush=True)

    log(f"synthetic {kind}: {clips} clips {size[0]}x{size[1]} at {fps} fps in {args.data}")
    dataset, src = make_data(kind, clips, size, fps, args.data)
    # one shard per split: 2 workers must share a shard's clips
    cfg = ExtractConfig(spec=spec_preset("paper", dataset if dataset == "cremad" else "kinetics-sounds"),
                        shard_size=clips)
    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="avprep-bench-") as work:
        t, cpu, startup = measure(dataset, src, cfg, args.reps, Path(work), log)
        assembler = assembler_seconds_per_clip(dataset, src, cfg, Path(work))
    result = {
        "kind": kind, "clips": clips, "source": f"{size[0]}x{size[1]} @ {fps} fps",
        "options": "paper preset (soxr), 1 fps, frame size 256, JPEG 90, float16, one shard per split",
        "reps": args.reps, "one_time_seconds": startup,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_1min": {"before": load_before, "after": _load()},
        "seconds": {k: round(v, 3) for k, v in t.items()},
        "clips_per_s": {k: round(clips / v, 2) for k, v in t.items()},
        # CPU time: on a loaded machine the one-core ratios are best read from these
        # (pool workers are not our children)
        "cpu_seconds": {k: round(v, 3) for k, v in cpu.items() if k != "avprep-2"},
        "cpu_ratios": {"extract_over_floor": round(cpu["avprep-1"] / cpu["floor"], 3),
                       "convert_over_floor": round(cpu["convert"] / cpu["floor"], 3),
                       "reference_over_extract": round(cpu["reference"] / cpu["avprep-1"], 3),
                       "reference_over_floor": round(cpu["reference"] / cpu["floor"], 3)},
        "seconds_per_clip_core": round(t["avprep-1"] / clips, 4),
        "assembler_seconds_per_clip": round(assembler, 5),
        "ratios": {"extract_over_floor": round(t["avprep-1"] / t["floor"], 3),
                   "convert_over_floor": round(t["convert"] / t["floor"], 3),
                   "extract_over_convert": round(t["avprep-1"] / t["convert"], 3),
                   "reference_over_extract": round(t["reference"] / t["avprep-1"], 3),
                   "reference_over_floor": round(t["reference"] / t["floor"], 3),
                   "speedup_2_workers": round(t["avprep-1"] / t["avprep-2"], 3)},
        "targets": {"extract_over_floor": "<= 1.25 (where the ceiling convert_over_floor allows it)",
                    "extract_over_convert": "<= 1.25",
                    "reference_over_extract": ">= 3 (or the ceiling reference_over_floor)",
                    "speedup_2_workers": ">= 1.8"},
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for k in ("seconds", "clips_per_s", "ratios"):
            print(f"{k}: " + ", ".join(f"{n}={v}" for n, v in result[k].items()))
        print(f"seconds_per_clip_core: {result['seconds_per_clip_core']}")
        print("targets: " + ", ".join(f"{n} {v}" for n, v in result["targets"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
