"""``python -m ogmge_train`` and ``torchrun ... -m ogmge_train``: the ``ogmge-train`` command.

The entry point, not part of the library: no module of ``ogmge_train`` imports this one, so the
library still never imports the CLI (tests/test_cli_train.py checks both).
"""
from cli.train_cli import main

main()
