"""`ogmge-train`: the click group over ogmge_train (README: Training).

``ogmge-train --shards OUT [--out RUN] [...]`` trains (the same as ``ogmge-train train ...``): a
first argument that starts with ``-`` and is not --help/--version means ``train``; a first
argument that is no subcommand is a typo (``No such command 'evalute'. Did you mean
'evaluate'?``). Commands: ``train``, ``evaluate`` (cli/_train_commands.py), ``probe``,
``report``, ``sweep``, ``reproduce`` (cli/_train_extra.py), each registered here once.

Multi-process training: ``torchrun --nproc-per-node N -m ogmge_train ...`` (its entry point,
``ogmge_train/__main__.py``, runs this group; no library module imports the CLI) or
``torchrun ... $(which ogmge-train) ...``; only rank 0 draws.
"""
from __future__ import annotations

import click

from . import _ui
from ._train_commands import evaluate_cmd, train_cmd
from ._train_extra import probe_cmd, report_cmd, reproduce_cmd, sweep_cmd

_TOP_LEVEL = ("-h", "--help", "--version")


class _DefaultToTrain(_ui.Group):
    """Options before any subcommand start ``train``; an unknown word is a typo."""

    def parse_args(self, ctx, args):
        if args and args[0].startswith("-") and args[0] not in _TOP_LEVEL:
            args = ["train", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultToTrain, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="avprep-ogmge")
def main():
    """Train audio-visual models with OGM-GE on avprep shards.

    Without a subcommand, the options are those of `train`
    (`ogmge-train --shards S --out RUN` = `ogmge-train train --shards S --out RUN`).
    """


for _cmd in (train_cmd, evaluate_cmd, probe_cmd, report_cmd, sweep_cmd, reproduce_cmd):
    main.add_command(_cmd)

if __name__ == "__main__":
    main()
