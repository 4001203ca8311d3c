"""`avprep`: click front-end over the avprep library. Commands live in one module each."""
from __future__ import annotations

import click

from ._avprep_commands import datasets_cmd, extract_cmd, index_cmd, info_cmd, upload_cmd
from ._synth_command import synth_cmd
from ._verify_command import verify_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="avprep-ogmge")
def main():
    """Prepare audio-visual datasets as verified WebDataset shards."""


for _cmd in (extract_cmd, verify_cmd, synth_cmd, datasets_cmd, info_cmd, index_cmd, upload_cmd):
    main.add_command(_cmd)

if __name__ == "__main__":
    main()
