"""`avprep extract | datasets | info | upload`: argument parsing, progress and tables only."""
from __future__ import annotations

import time

import click

from avprep import shardformat as sf
from avprep.config import FRAME_RULES, PRESET_NAMES, RESAMPLERS, ExtractConfig, spec_preset
from avprep.errors import ConfigError

from . import _ui


def _parse_bytes(ctx, param, value):
    """``--shard-max-bytes 500M`` style sizes (K/M/G = 10^3/10^6/10^9)."""
    if value is None:
        return None
    units = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    text = value.strip().upper().removesuffix("B")
    try:
        n = int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)
    except (ValueError, KeyError):
        raise click.BadParameter(f"{value!r} is not a size like 500000000 or 500M") from None
    if n < 1:
        raise click.BadParameter("must be positive")
    return n


@click.command("extract")
@click.option("--dataset", "dataset", required=True, type=_ui.DatasetChoice(),
              help="Dataset adapter (`avprep datasets` lists their raw layouts).")
@click.option("--src", required=True, type=click.Path(exists=True, file_okay=False), help="Raw dataset folder.")
@click.option("--out", required=True, help="Output folder, or s3://bucket/prefix.")
@click.option("--spec", "spec", type=click.Choice(PRESET_NAMES), default="paper", show_default=True,
              help="Spectrogram preset (README: What is extracted).")
@click.option("--sample-rate", type=int, show_default="the preset's", help="Override the preset's sample rate.")
@click.option("--n-fft", type=int, show_default="the preset's", help="Override the preset's FFT size.")
@click.option("--hop-length", type=int, show_default="the preset's", help="Override the preset's hop.")
@click.option("--win-length", type=int, show_default="the preset's", help="Override the preset's window length.")
@click.option("--center/--no-center", default=None, show_default="the preset's",
              help="Override the preset's STFT centring.")
@click.option("--duration", type=float, show_default="the preset's: 3 s CREMA-D, 10 s others",
              help="Override the preset's audio duration (seconds).")
@click.option("--resampler", type=click.Choice(RESAMPLERS),
              show_default="the preset's reference pipeline: soxr (librosa.load) for paper, paper-scipy, "
                           "ogmge-code, ogmge-code-vggsound; ffmpeg for fbank",
              help="Audio resampler.")
@click.option("--fps", type=click.IntRange(min=1), default=1, show_default=True, help="Frames per second kept.")
@click.option("--frame-rule", type=click.Choice(FRAME_RULES), default="middle", show_default=True,
              help="Frames at t = i + 0.5 s (middle) or at t = i s with a partial last second "
                   "(start: the released OGM-GE CREMA-D script).")
@click.option("--frame-size", type=int, default=256, show_default=True, help="Short side in pixels (0 keeps).")
@click.option("--jpeg-quality", type=int, default=90, show_default=True, help="JPEG quality of the frames (1-100).")
@click.option("--spec-dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Storage type of the spectrograms.")
@click.option("--shard-size", type=int, default=1000, show_default=True, help="Samples per shard (at most).")
@click.option("--shard-max-bytes", callback=_parse_bytes, show_default="no size cap",
              help="Also cap shards by estimated size, e.g. 1G.")
@click.option("--workers", type=click.IntRange(min=1),
              show_default="all cores; with --engine ray, the cluster's CPUs", help="Parallel workers.")
@click.option("--engine", type=click.Choice(["serial", "local", "ray"]),
              show_default="serial for --workers 1, else local; ray with --ray-address",
              help="Where clips are extracted: this process, local worker processes, or a Ray cluster.")
@click.option("--ray-address", show_default="a local Ray for the run",
              help="Ray cluster to use (auto, host:6379, ray://host:10001).")
@click.option("--retry-failed", is_flag=True,
              help="Extract again the clips that failed in an earlier run (clips that failed to open "
                   "are always retried).")
@click.option("--split-file", "split_files", multiple=True, show_default="none: the dataset's own splits or a hash",
              help="Published split file, PATH or SPLIT=PATH (repeatable).")
@click.option("--splits", "splits", show_default="recorded when the splits match an entry",
              help="Registry entry the splits must be (`avprep splits list`), e.g. kinetics-sounds/ogmge.")
@click.option("--split-by", show_default="none: by clip name",
              help="Group for disjoint splits, e.g. speaker (CREMA-D).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of hash splits.")
@click.option("--max-failures", type=click.FloatRange(0, 1), default=0.05, show_default=True,
              help="Exit 1 when more than this fraction of clips fails.")
@click.option("--overwrite", is_flag=True, help="Start over instead of resuming.")
@click.option("--s3-endpoint", envvar="AWS_ENDPOINT_URL", show_default="$AWS_ENDPOINT_URL",
              help="S3-compatible endpoint for s3:// outputs.")
@click.option("--staging", type=click.Path(file_okay=False), show_default="one per URL in the temp folder",
              help="Local folder for an s3:// output.")
@_ui.handle_errors(interrupt_hint=_ui.RESUME_HINT)
def extract_cmd(dataset, src, out, spec, sample_rate, n_fft, hop_length, win_length, center, duration,
                resampler, fps, frame_rule, frame_size, jpeg_quality, spec_dtype, shard_size, shard_max_bytes,
                workers, engine, ray_address, retry_failed, split_files, splits, split_by, seed, max_failures,
                overwrite, s3_endpoint, staging):
    """Extract a raw dataset into WebDataset shards with manifests (resumable)."""
    from avprep.datasets import get
    from avprep.extract import extract

    dataset = get(dataset).name
    spec_cfg = spec_preset(spec, dataset, sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length,
                           win_length=win_length, center=center, duration=duration, resampler=resampler)
    cfg = ExtractConfig(spec=spec_cfg, fps=fps, frame_rule=frame_rule, frame_size=frame_size,
                        jpeg_quality=jpeg_quality,
                        spec_dtype=spec_dtype, shard_size=shard_size, shard_max_bytes=shard_max_bytes)
    with _ui.make_progress("clips", extra="failures") as progress:
        on_event = _ExtractProgress(progress)
        result = extract(dataset, src, out, cfg, workers=workers, engine=engine,
                         ray_address=ray_address, retry_failed=retry_failed, split_files=split_files,
                         split_by=split_by, seed=seed, overwrite=overwrite,
                         max_failures=max_failures, on_event=on_event, s3_endpoint=s3_endpoint,
                         staging=staging, splits=splits)
    _print_summary(result, on_event)
    if not result.ok:
        _ui.error(f"{result.failed_fraction:.1%} of clips failed (more than --max-failures "
                  f"{max_failures:.1%}); see {result.out}/{sf.FAILURES}")
        raise click.exceptions.Exit(_ui.EXIT_PROBLEMS)


class _ExtractProgress:
    """ExtractEvent → progress display; resumed shards shrink the bar instead of inflating
    clips/s. Keeps what the summary's rate needs, so the bar's final rate and the summary's agree:
    clips extracted in this run over the seconds since extraction started."""

    def __init__(self, progress):
        self.progress, self.task, self.resumed = progress, None, 0
        self.check = None
        self.t_start = self.t_last = None
        self.done = 0

    def __call__(self, e) -> None:
        now = time.monotonic()
        if e.kind == "check":       # an earlier run's shards, hashed before anything is extracted
            if self.check is None:
                self.check = self.progress.add_task("check finished shards", total=e.total, failures="")
            self.progress.update(self.check, completed=e.done)
            return
        if e.kind == "start":
            if self.check is not None:
                self.progress.remove_task(self.check)
            self.task = self.progress.add_task("extract", total=e.total, failures="")
            self.t_start = self.t_last = now
            return
        if e.kind == "resumed":
            self.resumed = e.done
        elif e.kind != "finish":
            self.t_last = now
        self.done = e.done - self.resumed
        failures = f"[red]{e.failed} failed" if e.failed else ""
        self.progress.update(self.task, total=e.total - self.resumed, completed=self.done, failures=failures)

    def rate(self) -> str:
        """``89.3 clips/s`` over the clips extracted in this run, or what was resumed instead."""
        seconds = (self.t_last - self.t_start) if self.t_start is not None else 0.0
        parts = [f"{self.done / seconds:.1f} clips/s" if self.done and seconds > 0 else "nothing extracted"]
        if self.resumed:
            parts.append(f"{self.resumed} clips resumed")
        return ", ".join(parts)


def _print_summary(result, progress: _ExtractProgress) -> None:
    splits = list(result.samples)
    rows = [[c] + [result.samples[s].get(c, 0) for s in splits]
            + [sum(result.samples[s].get(c, 0) for s in splits)] for c in result.classes]
    totals = ["total"] + [sum(result.samples[s].values()) for s in splits] + [result.num_samples]
    numeric = set(range(1, len(splits) + 2))
    if len(rows) <= 40:
        _ui.console.print(_ui.table("samples per class", ["class", *splits, "all"], rows + [totals], numeric=numeric))
    else:
        _ui.console.print(_ui.table(f"samples ({len(rows)} classes)", ["", *splits, "all"], [totals], numeric=numeric))
    if result.failures_by_stage:
        _ui.console.print(_ui.table("failures by stage", ["stage", "clips"],
                                    result.failures_by_stage.items(), numeric={1}))
    for note in result.notes:
        _ui.console.print(f"note: {note}")
    if result.split_registry:
        _ui.console.print(f"splits: {result.split_registry['id']} ({result.split_registry['title']})")
    for line in result.availability:
        _ui.console.print(f"downloaded: {line}")
    for reason, n in result.skipped.items():
        _ui.console.print(f"skipped {n} clip(s): {reason}")
    resumed = f", {result.resumed_shards} resumed" if result.resumed_shards else ""
    failed = sum(n for stage, n in result.failures_by_stage.items() if stage != "missing")
    _ui.console.print(f"{result.num_samples} samples in {result.num_shards} shard(s){resumed}, "
                      f"{failed} failed → {result.out}  ({result.wall_time:.1f} s, {progress.rate()})")
    first = [f for f in result.failures if f["stage"] != "missing"][:5] or result.failures[:5]
    if first:
        _ui.console.print(_ui.table(f"first failures (of {len(result.failures)}, all in {sf.FAILURES})",
                                    ["key", "stage", "error"], [(f["key"], f["stage"], f["error"]) for f in first]))


@click.command("datasets")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def datasets_cmd(as_json):
    """List the supported datasets, their raw layouts and class counts."""
    from avprep.datasets import ADAPTERS

    rows = [{"name": name, "layout": a.layout, "classes": a.num_classes}
            for name, a in ADAPTERS.items()]
    if as_json:
        _ui.print_json(rows)
        return
    _ui.console.print(_ui.table("supported datasets", ["dataset", "raw layout", "classes"],
                                [(r["name"], r["layout"], "from data" if r["classes"] is None else r["classes"])
                                 for r in rows], numeric={2}))


def _read_output(location: str, s3_endpoint: str | None = None):
    """The dataset (dataset.json and the split manifests) at a local folder or URL."""
    from avprep import shardformat as sf
    from avprep.errors import StorageError

    try:
        return sf.open_dataset(location, s3_endpoint=s3_endpoint)
    except StorageError as e:
        raise ConfigError(f"{location}: cannot read ({e}); is the extraction finished?") from None
    except sf.ShardDataError as e:
        raise ConfigError(str(e)) from None


@click.command("info")
@click.argument("out")
@click.option("--json", "as_json", is_flag=True, help=f"Print {sf.DATASET} and the manifests as one JSON document.")
@click.option("--s3-endpoint", envvar="AWS_ENDPOINT_URL", show_default="$AWS_ENDPOINT_URL",
              help="S3-compatible endpoint for s3:// locations.")
@_ui.handle_errors
def info_cmd(out, as_json, s3_endpoint):
    """Show an extracted dataset (a folder, http(s):// or s3:// prefix): options, splits, shards
    and class counts."""
    import json

    opened = _read_output(out, s3_endpoint)
    dataset, manifests = opened.meta, opened.splits
    if as_json:
        _ui.print_json({"dataset": dataset.raw,
                        "manifests": {s: json.loads(m.to_json()) for s, m in manifests.items()}})
        return
    cfg = dataset.config
    spec = cfg.get("spec", {}) if isinstance(cfg.get("spec"), dict) else {}
    shape = dataset.spec_shape
    shown = {"dataset": dataset.name, "tool version": dataset.raw.get("tool_version"),
             "classes": len(dataset.classes), "spec preset": spec.get("preset"),
             "spec shape": "×".join(map(str, shape)) if shape else "?", "spec dtype": cfg.get("spec_dtype"),
             "sample rate": spec.get("sample_rate"), "resampler": spec.get("resampler"),
             "audio duration": spec.get("duration"), "fps": cfg.get("fps"), "frame rule": cfg.get("frame_rule"),
             "frame size": cfg.get("frame_size"), "jpeg quality": cfg.get("jpeg_quality"),
             "max frames": dataset.max_frames, "failures": dataset.raw.get("num_failures")}
    registry, availability = dataset.raw.get("split_registry"), dataset.raw.get("availability")
    if isinstance(registry, dict):
        shown["splits"] = registry.get("id")
    if isinstance(availability, dict):
        shown["downloaded"] = f"{availability.get('available')} of {availability.get('listed')} listed clips"
    extra = cfg.get("extra") if isinstance(cfg.get("extra"), dict) else {}
    for k, v in sorted(extra.items()):
        if v not in (None, [], {}):
            shown[k.replace("_", " ")] = (", ".join(str(f.get("name")) for f in v if isinstance(f, dict))
                                          if k == "split_files" and isinstance(v, list) else v)
    _ui.console.print(_ui.table(str(out), ["", ""], [(k, str(v)) for k, v in shown.items()], show_header=False))
    rows = [(s, m.num_samples, len(m.shards), _ui.human_bytes(sum(x.bytes for x in m.shards)))
            for s, m in manifests.items()]
    _ui.console.print(_ui.table("splits", ["split", "samples", "shards", "size"], rows, numeric={1, 2, 3}))
    classes = dataset.classes
    if len(classes) <= 40:
        rows = [[i, c] + [m.class_counts.get(c, 0) for m in manifests.values()] for i, c in enumerate(classes)]
        _ui.console.print(_ui.table("class counts", ["index", "class", *manifests], rows,
                                    numeric=set(range(2, 2 + len(manifests))) | {0}))


@click.command("index")
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@_ui.handle_errors
def index_cmd(out):
    """Add the sample index (byte offset, length and CRC-32 of every sample) to a dataset
    extracted by an older avprep, reading each shard once and rewriting none."""
    from avprep.errors import StorageError
    from avprep.shardformat import ShardDataError
    from avprep.shards import index_dataset

    with _ui.make_progress("shards", transient=True) as progress:
        task = progress.add_task("index", total=None)
        try:
            counts = index_dataset(out, on_progress=lambda done, total, name: progress.update(
                task, completed=done, total=total, description=f"index {name}"))
        except ShardDataError as e:
            raise ConfigError(f"{e}; run `avprep verify {out}`") from None
        except StorageError as e:
            raise ConfigError(f"{out}: cannot read ({e}); is the extraction finished?") from None
    _ui.console.print(", ".join(f"{s}: {n} samples indexed" for s, n in counts.items()))


@click.command("upload")
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.argument("url")
@click.option("--s3-endpoint", envvar="AWS_ENDPOINT_URL", show_default="$AWS_ENDPOINT_URL",
              help="S3-compatible endpoint.")
@click.option("--create-bucket", is_flag=True, help="Create the bucket when it does not exist.")
@_ui.handle_errors
def upload_cmd(out, url, s3_endpoint, create_bucket):
    """Upload an extracted folder to s3://bucket/prefix (shards first, manifests and dataset.json last)."""
    from pathlib import Path

    from avprep.upload import upload_folder

    if not (Path(out) / sf.DATASET).exists():
        raise ConfigError(f"{out}: no {sf.DATASET}; is the extraction finished?")
    with _ui.make_progress("bytes") as progress:
        task = progress.add_task("upload", total=None)
        names = upload_folder(out, url, s3_endpoint=s3_endpoint, create_bucket=create_bucket,
                              on_progress=lambda done, total, name: progress.update(task, completed=done, total=total))
    _ui.console.print(f"uploaded {len(names)} file(s) → {url}")
