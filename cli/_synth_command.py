"""`avprep synth`: write a synthetic raw dataset (real encoded media, controllable cues)."""
from __future__ import annotations

from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from avprep import synth
from avprep.errors import ConfigError


@click.command("synth")
@click.option("--dataset", "dataset", required=True, type=click.Choice(synth.DATASETS),
              help="Raw layout to write (SPEC §2).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write the raw dataset into.")
@click.option("--clips", required=True, type=click.IntRange(min=1), help="Number of clips.")
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed, same bytes.")
@click.option("--audio-snr", default=20.0, show_default=True, type=float,
              help="Audio cue strength in dB (tone vs noise); -inf for no cue.")
@click.option("--visual-snr", default=20.0, show_default=True, type=float,
              help="Visual cue strength in dB (class colour vs noise); -inf for no cue.")
@click.option("--classes", "num_classes", default=None, type=click.IntRange(min=1),
              help="Number of classes (default: the dataset's own count; VGGSound 10, folder 5).")
@click.option("--duration", default=None, type=click.FloatRange(min=0.1),
              help="Clip length in seconds (default: CREMA-D 2-4 s, others 10 s).")
@click.option("--fps", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--size", default="96x72", show_default=True, help="Frame size WxH.")
def synth_cmd(dataset, out, clips, seed, audio_snr, visual_snr, num_classes, duration, fps, size):
    """Write a synthetic raw DATASET in its real layout, e.g. to try `avprep extract`."""
    try:
        w, h = (int(v) for v in size.lower().split("x"))
        if w < 2 or h < 2:
            raise ValueError
    except ValueError:
        raise click.BadParameter(f"expected WxH with both at least 2, got {size!r}", param_hint="--size")
    if out.exists() and any(out.iterdir()):
        raise click.UsageError(f"{out} is not empty; choose a new folder")
    try:
        synth.check_options(dataset, clips, num_classes)
        with Progress(TextColumn("[bold]synth {task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn()) as progress:
            task = progress.add_task(dataset, total=None)
            synth.make_dataset(dataset, out, clips, seed=seed, audio_snr=audio_snr,
                               visual_snr=visual_snr, num_classes=num_classes, duration=duration,
                               fps=fps, size=(w, h),
                               on_progress=lambda done, total: progress.update(task, completed=done, total=total))
    except ConfigError as e:          # bad class count etc.: a usage error (exit 2)
        raise click.UsageError(str(e))
    click.echo(f"wrote {clips} {dataset} clips to {out}")
