"""`ogmge-train`: click front-end over ogmge_train (SPEC §5).

``ogmge-train --shards OUT --out RUN [...]`` trains (the same as ``ogmge-train train ...``);
``ogmge-train evaluate RUN`` scores a saved checkpoint. ``python -m ogmge_train`` is this CLI,
which is what ``torchrun --nproc-per-node N -m ogmge_train ...`` launches; only rank 0 draws.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import click

from avprep.errors import ConfigError

from ._ui import console, err_console, fail, handle_errors, make_progress, print_json, table

from ogmge_train.config import CHOICES, PRESETS, resolve


# Commands written in their own module (cli/_train_extra.py), loaded when first asked for: lazily,
# so that module may import this one without a cycle, and `ogmge-train train` starts faster.
_EXTRA = {"probe": "probe_cmd", "report": "report_cmd", "sweep": "sweep_cmd"}


def _extra_command(name: str):
    try:
        from . import _train_extra
    except ImportError as e:
        if e.name != f"{__package__}._train_extra":
            raise
        return None
    return getattr(_train_extra, _EXTRA[name], None)


class _DefaultToTrain(click.Group):
    """A group whose first argument, when it is not a subcommand, starts ``train``."""

    def list_commands(self, ctx):
        return sorted({*self.commands, *(n for n in _EXTRA if _extra_command(n) is not None)})

    def get_command(self, ctx, name):
        cmd = super().get_command(ctx, name)
        return cmd if cmd is not None or name not in _EXTRA else _extra_command(name)

    def parse_args(self, ctx, args):
        if args and args[0] not in (*self.commands, *_EXTRA, "-h", "--help", "--version"):
            args = ["train", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultToTrain, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="avprep-ogmge")
def main():
    """Train audio-visual models with OGM-GE on avprep shards.

    Without a subcommand, the arguments are those of `train`.
    """


def _choice(name: str):
    return click.Choice(CHOICES[name])


@main.command("train")
@click.option("--shards", help="Shard folder or URL (http(s)://, s3://) holding dataset.json.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Run folder.")
@click.option("--preset", type=click.Choice(list(PRESETS)), help="Defaults of a paper setting or `demo` (CPU).")
@click.option("--fusion", type=_choice("fusion"))
@click.option("--modulation", type=_choice("modulation"), help="Default: ogm-ge.")
@click.option("--alpha", type=float, help="OGM strength (default per dataset: 0.8 CREMA-D, 0.1 VGGSound, 0.3 others).")
@click.option("--modulation-start", type=int, help="First modulated epoch (0-based, inclusive).")
@click.option("--modulation-end", type=int, help="Last modulated epoch (inclusive).")
@click.option("--modulation-scope", type=_choice("modulation_scope"), help="conv weights (reference) or all encoder params.")
@click.option("--drop-p", type=float, help="Modality-drop probability.")
@click.option("--modality", type=_choice("modality"), help="both, or a unimodal baseline.")
@click.option("--epochs", type=int)
@click.option("--batch-size", type=int, help="Per process (global batch = this x processes).")
@click.option("--lr", type=float)
@click.option("--optimizer", type=_choice("optimizer"))
@click.option("--weight-decay", type=float)
@click.option("--lr-step", type=int, help="StepLR period in epochs.")
@click.option("--lr-gamma", type=float)
@click.option("--frames", type=int, help="Frames per clip (default: CREMA-D 1, others 3).")
@click.option("--image-size", type=int)
@click.option("--arch", type=_choice("arch"))
@click.option("--workers", type=int, help="Data loader processes per training process.")
@click.option("--device", type=_choice("device"))
@click.option("--amp", type=_choice("amp"), help="bf16 autocast.")
@click.option("--seed", type=int)
@click.option("--s3-endpoint", help="Endpoint URL of an S3-compatible store.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from last.pt (its config.json is the base).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@handle_errors
def train_cmd(preset, resume, as_json, **explicit):
    """Train a model on shards into a run folder."""
    from ogmge_train.train import train

    base = _stored_config(explicit["out"]) if resume else None
    if explicit["shards"] and "://" not in explicit["shards"]:
        # config.json records an absolute folder, so evaluate/probe work from any directory
        explicit["shards"] = str(Path(explicit["shards"]).resolve())
    cfg = resolve(preset, base=base, **explicit)
    if not cfg.shards:
        raise ConfigError("--shards is required (the folder or URL written by `avprep extract`)")
    with _TrainProgress() as progress:
        summary = train(cfg, resume=resume, on_event=progress)
    if not summary:  # ranks other than 0 stay quiet
        return
    if as_json:
        print_json(summary)
    else:
        _print_summary(summary)


def _stored_config(out: str) -> dict | None:
    path = Path(out) / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e


class _TrainProgress:
    """on_event receiver: one progress bar per epoch, one summary line after each."""

    def __enter__(self):
        self.progress = make_progress("steps", extra="stats").__enter__()
        self.task = None
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def __call__(self, e: dict) -> None:
        kind = e["event"]
        if kind == "start":
            err_console.print(f"training on {e['device']} x{e['world_size']}, epochs {e['start_epoch']}.."
                              f"{e['epochs'] - 1}, {e['steps']} steps/epoch")
        elif kind == "epoch_start":
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task(f"epoch {e['epoch']}", total=e["steps"], stats="")
        elif kind == "step":
            stats = (f"loss {e['loss']:.3f} acc {e['acc']:.3f} rho_a {e['rho_a']:.2f} rho_v {e['rho_v']:.2f} "
                     f"{e['samples_per_s']:.0f} samples/s")
            self.progress.update(self.task, completed=e["step"], stats=stats)
        elif kind == "eval":
            self.progress.update(self.task, stats=f"evaluating {e['split']}")
        elif kind == "epoch_end":
            self.progress.console.print(_epoch_line(e["record"], e["best"]))


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _epoch_line(r: dict, best: bool) -> str:
    parts = [f"epoch {r['epoch']}", f"loss {_fmt(r['train']['loss'])}", f"train acc {_fmt(r['train']['acc'])}"]
    for split in ("val", "test"):
        if r.get(split):
            parts.append(f"{split} acc {_fmt(r[split].get('acc'))} mAP {_fmt(r[split].get('map'))}")
    parts.append(f"rho_v {_fmt(r['rho_v'])} k_a {_fmt(r['k_a'])} k_v {_fmt(r['k_v'])}")
    parts.append(f"{r['samples_per_s']:.0f} samples/s")
    return " | ".join(parts) + (" [green]*[/]" if best else "")


def _metrics_table(title: str, rows: dict[str, dict]):
    keys = ["loss", "acc", "map", "acc_a", "map_a", "acc_v", "map_v"]
    return table(title, ["split", *keys], ([s, *(_fmt(m.get(k)) for k in keys)] for s, m in rows.items()),
                 numeric=set(range(1, len(keys) + 1)))


def _print_summary(summary: dict) -> None:
    how = "by val accuracy" if summary.get("selection") == "val_acc" else "last epoch (no val split)"
    rows = {s: summary[s] for s in ("val", "test") if summary.get(s)}
    console.print(_metrics_table(f"selected epoch {summary['selected_epoch']} ({how})", rows))


@main.command("evaluate")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--split", default="test", show_default=True)
@click.option("--which", type=click.Choice(["best", "last"]), default="best", show_default=True)
@click.option("--shards", help="Evaluate on these shards instead of the run's own.")
@click.option("--device", type=_choice("device"), default="auto", show_default=True)
@click.option("--workers", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@handle_errors
def evaluate_cmd(run, split, which, shards, device, workers, as_json):
    """Score a saved checkpoint of RUN on one split."""
    from ogmge_train.train import evaluate

    metrics = evaluate(run, split=split, which=which, shards=shards, device=device, workers=workers)
    if not metrics:
        fail(f"{run}: split {split!r} has no samples")
    if as_json:
        print_json(metrics)
    else:
        console.print(_metrics_table(f"{run} ({which}.pt)", {split: metrics}))


if __name__ == "__main__":
    main()
