"""Per-second segment labels of a sample (README: Output; AVE event localisation), owned here.

A sample whose clip has an annotated event (AVE: ``Annotations.txt``'s StartTime and EndTime,
``json["event"] = [start, end]`` seconds) carries ``json["segments"]``: one label per 1 s segment
of the extracted clip, the clip's ``label_index`` where the segment's middle (t + 0.5 s) lies in
the event, else ``BACKGROUND`` (-1). For AVE's whole-second annotations that is segment t in
[start, end), ten segments for the 10 s clips. Shards written before ``segments`` existed are
still read: their labels are derived from ``event``, ``label_index`` and the clip ``duration``.
"""
from __future__ import annotations

import math

from .errors import ShardDataError

SEGMENTS = "segments"       # the json key
EVENT = "event"
BACKGROUND = -1
MAX_SEGMENTS = 10_000       # a json claiming more is not ours


def segment_labels(event, label_index: int, segments: int) -> list[int]:
    """The label of each of ``segments`` 1 s segments for an event ``[start, end]`` in seconds."""
    start, end = float(event[0]), float(event[1])
    return [int(label_index) if start <= t + 0.5 <= end else BACKGROUND for t in range(segments)]


def count_segments(duration: float) -> int:
    """Whole 1 s segments of a clip of ``duration`` seconds (at least one)."""
    return max(1, int(math.floor(duration + 1e-6)))


def parse_segments(meta: dict, num_classes: int | None = None) -> list[int] | None:
    """The segment labels of a sample's json (``meta``), checked: a list of ints in
    [-1, num_classes); from ``event`` for older shards; None when the sample has neither."""
    if SEGMENTS in meta:
        labels = meta[SEGMENTS]
        if not isinstance(labels, list) or not 1 <= len(labels) <= MAX_SEGMENTS or \
                not all(isinstance(x, int) and not isinstance(x, bool) for x in labels):
            raise ShardDataError(f"json {SEGMENTS} is not a list of integer labels", check="json")
        bad = [x for x in labels if x < BACKGROUND or (num_classes is not None and x >= num_classes)]
        if bad:
            raise ShardDataError(f"json {SEGMENTS} has label {bad[0]} outside [-1, {num_classes})", check="json")
        return labels
    if EVENT in meta:
        event, index, duration = meta[EVENT], meta.get("label_index"), meta.get("duration")
        ok = (isinstance(event, list) and len(event) == 2 and all(isinstance(x, int | float) for x in event)
              and isinstance(index, int) and isinstance(duration, int | float) and 0 < duration < MAX_SEGMENTS)
        if not ok or index is None or duration is None:
            raise ShardDataError(f"json {EVENT} / label_index / duration cannot give segment labels", check="json")
        return segment_labels(event, index, count_segments(duration))
    return None
