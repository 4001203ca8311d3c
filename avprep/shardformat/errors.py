"""The one error of the shard format's readers."""
from __future__ import annotations

from ..errors import AvprepError


class ShardDataError(AvprepError):
    """A shard, sample, index or manifest is malformed or unsafe (the message names where).

    ``check`` says what kind of problem it is (``security`` for refused content, ``tar``,
    ``checksum``, ``spec``, ``cls``, ``frame``, ``members``, ``manifest``, ``index`` ...);
    ``shard``/``key`` locate it when known."""

    def __init__(self, message: str, *, check: str = "data", shard: str = "", key: str = ""):
        super().__init__(message)
        self.check, self.shard, self.key = check, shard, key
