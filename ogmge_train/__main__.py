"""`python -m ogmge_train ...` (what torchrun launches) is the `ogmge-train` CLI."""
from cli.train_cli import main

main()
