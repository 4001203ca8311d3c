"""`avprep synth`: write a synthetic raw dataset (real encoded media, controllable cues)."""
from __future__ import annotations

from pathlib import Path

import click

from avprep import synth

from . import _ui


@click.command("synth")
@click.option("--dataset", "dataset", required=True, type=_ui.DatasetChoice(),
              help="Raw layout to write (README: Datasets).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write the raw dataset into.")
@click.option("--clips", required=True, type=click.IntRange(min=1), help="Number of clips.")
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed, same bytes.")
@click.option("--audio-snr", default=20.0, show_default=True, type=float,
              help="Audio cue strength in dB (tone vs noise); -inf for no cue.")
@click.option("--visual-snr", default=20.0, show_default=True, type=float,
              help="Visual cue strength in dB (class colour vs noise); -inf for no cue.")
@click.option("--audio-cue-fraction", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="Share of clips whose audio carries the class tone; the others' audio is noise only.")
@click.option("--classes", "num_classes", default=None, type=click.IntRange(min=1),
              show_default="the dataset's own count; VGGSound 10, folder 5", help="Number of classes.")
@click.option("--duration", default=None, type=click.FloatRange(min=0.1),
              show_default="CREMA-D 2-4 s, others 10 s", help="Clip length in seconds.")
@click.option("--fps", default=10, show_default=True, type=click.IntRange(min=1), help="Frame rate of the clips.")
@click.option("--size", default="96x72", show_default=True, help="Frame size WxH.")
@_ui.handle_errors(interrupt_hint=lambda: _ui.render_hint(
    f"interrupted; {click.get_current_context().params['out']} holds part of the dataset: delete it, then "
    "`{command}` starts again"))
def synth_cmd(dataset, out, clips, seed, audio_snr, visual_snr, audio_cue_fraction, num_classes, duration, fps,
              size):
    """Write a synthetic raw DATASET in its real layout, e.g. to try `avprep extract`."""
    try:
        w, h = (int(v) for v in size.lower().split("x"))
        if w < 2 or h < 2:
            raise ValueError
    except ValueError:
        raise click.BadParameter(f"expected WxH with both at least 2, got {size!r}", param_hint="--size") from None
    if out.exists() and any(out.iterdir()):
        _ui.fail(f"{out} is not empty; choose a new folder")
    synth.check_options(dataset, clips, num_classes)     # ConfigError: exit 2
    with _ui.make_progress("clips") as progress:
        task = progress.add_task(f"synth {dataset}", total=None)
        synth.make_dataset(dataset, out, clips, seed=seed, audio_snr=audio_snr,
                           visual_snr=visual_snr, audio_cue_fraction=audio_cue_fraction,
                           num_classes=num_classes, duration=duration,
                           fps=fps, size=(w, h),
                           on_progress=lambda done, total: progress.update(task, completed=done, total=total))
    click.echo(f"wrote {clips} {dataset} clips to {out}")
