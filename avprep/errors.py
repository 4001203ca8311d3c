"""Typed errors raised by the avprep library. The CLI maps them to exit codes."""


class AvprepError(Exception):
    """Base class of every error avprep raises on purpose."""


class ConfigError(AvprepError):
    """Bad options or an output folder that does not match them (CLI exit 2)."""


class DatasetLayoutError(AvprepError):
    """The raw dataset folder does not have the expected layout."""


class ClipError(AvprepError):
    """One clip could not be extracted. ``stage`` says where it failed."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


class StorageError(AvprepError):
    """A shard location could not be read or written (after retries)."""
