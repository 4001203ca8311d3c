"""Typed errors raised by the ogmge_train library.

Each class carries ``exit_code`` (1: the job ran but found problems; 2: usage or configuration
the user must fix), which the CLI uses without special cases. Errors of the data layer
(``avprep.errors``) pass through unchanged.
"""


class TrainError(Exception):
    """Base class of every error ogmge_train raises on purpose."""

    exit_code = 1


class ConfigError(TrainError):
    """Bad or contradictory options (CLI exit 2)."""

    exit_code = 2


class RunFolderError(TrainError):
    """A path is not a run (or sweep) folder, or a run folder cannot be used as asked,
    e.g. ``--resume`` without ``last.pt`` (CLI exit 2)."""

    exit_code = 2


class DataError(TrainError):
    """Too many corrupt or unreadable samples (CLI exit 1)."""


class NonFiniteError(TrainError):
    """A non-finite loss or gradient stopped training; nothing non-finite was saved (exit 1)."""


class RunWriteError(TrainError):
    """A run-folder file could not be written (disk full, read-only folder); the temporary file
    was removed and the previous version of the file is intact (exit 1)."""


class PeerLostError(TrainError):
    """Another process of a multi-process (torchrun) run died or became unreachable; what the
    last finished epoch saved is intact (exit 1)."""
