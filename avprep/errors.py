"""Typed errors raised by the avprep library.

Each class carries ``exit_code``, the CLI exit status it maps to (1: the job ran but found
problems; 2: usage or configuration the user must fix), so the CLI needs no special cases.
"""


class AvprepError(Exception):
    """Base class of every error avprep raises on purpose."""

    exit_code = 1


class ConfigError(AvprepError):
    """Bad options or an output folder that does not match them (CLI exit 2)."""

    exit_code = 2


class DatasetLayoutError(AvprepError):
    """The raw dataset folder does not have the expected layout."""

    exit_code = 2


class ClipError(AvprepError):
    """One clip could not be extracted. ``stage`` says where it failed; ``retryable``: the
    file was missing, empty or unreadable, which a later run may find fixed."""

    def __init__(self, stage: str, message: str, retryable: bool = False):
        super().__init__(message)
        self.stage = stage
        self.retryable = retryable


class StorageError(AvprepError):
    """A shard location could not be read or written (after retries)."""


class OutputError(AvprepError):
    """The output folder cannot be written. A read-only folder or missing permission is the
    user's to fix (exit 2); a full disk or an I/O error stopped a job that had started (exit 1)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
