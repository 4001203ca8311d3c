"""`avprep`: the click group over the avprep library (README: Preparing data).

Commands: ``extract``, ``datasets``, ``info``, ``upload`` (cli/_avprep_commands.py), ``verify``
(cli/_verify_command.py), ``synth`` (cli/_synth_command.py), ``download`` (cli/_download_command.py),
``splits`` (cli/_splits_command.py), each registered here once.
"""
from __future__ import annotations

import click

from . import _ui
from ._avprep_commands import datasets_cmd, extract_cmd, index_cmd, info_cmd, upload_cmd
from ._download_command import download_cmd
from ._splits_command import splits_group
from ._synth_command import synth_cmd
from ._verify_command import verify_cmd


@click.group(cls=_ui.Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="avprep-ogmge")
def main():
    """Prepare audio-visual datasets as verified WebDataset shards."""


for _cmd in (extract_cmd, verify_cmd, synth_cmd, datasets_cmd, info_cmd, index_cmd, upload_cmd, download_cmd,
             splits_group):
    main.add_command(_cmd)

if __name__ == "__main__":
    main()
