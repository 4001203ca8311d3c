"""Audio-visual event localisation on AVE (README: Localisation on AVE): one prediction per 1 s
segment, over the C event classes plus background (the last class, index C).

A localisation model predicts *rows*: its logits are (B x S, C + 1), segment t of clip b in row
b x S + t. The trainer turns a batch's segment labels into the matching rows (``rows``), so every
method, the loss and the metrics work on segments unchanged: the cross-entropy of every segment
(the supervised setting), OGM's scores summed over segments, and the accuracy over rows is the AVE
papers' segment accuracy (``segment_accuracy``: right segments over all segments of the split).
"""
from __future__ import annotations

import torch

from .errors import ConfigError, DataError

__all__ = ["BACKGROUND", "rows", "segment_accuracy", "is_localisation"]

BACKGROUND = -1     # a background segment in the shards' segment labels


def is_localisation(model) -> bool:
    return getattr(getattr(model, "module", model), "task", "classification") == "localisation"


def rows(model, batch: dict, labels: torch.Tensor, keys: list) -> tuple[torch.Tensor, list]:
    """``(labels, keys)`` of the rows ``model`` predicts: the clip labels and keys as they are for a
    classifier; for a localisation model the segment labels (background -> C) flattened, each key
    repeated once per segment."""
    model = getattr(model, "module", model)
    if not is_localisation(model):
        return labels, keys
    seg = batch.get("segments")
    if seg is None:
        raise DataError("localisation needs segment labels: these shards carry none (extract AVE with "
                        "this build's avprep: each sample's json then has 'segments')")
    if seg.shape[1] != model.frames:
        raise ConfigError(f"--frames {model.frames}: the clips have {seg.shape[1]} segments; a localisation "
                          f"model takes one frame per segment (--frames {seg.shape[1]})")
    seg = seg.to(labels.device).long()
    seg = torch.where(seg == BACKGROUND, torch.full_like(seg, model.num_classes - 1), seg)
    return seg.flatten(), [k for k in keys for _ in range(seg.shape[1])]


def segment_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The AVE papers' metric: the fraction of all segments whose arg-max prediction is the
    segment's label. ``logits`` (N, S, K) or rows (N*S, K), ``labels`` (N, S) or (N*S,)."""
    pred = logits.reshape(-1, logits.shape[-1]).argmax(dim=1)
    truth = labels.reshape(-1)
    if pred.shape != truth.shape:
        raise ValueError(f"{pred.numel()} predicted segments for {truth.numel()} labels")
    return float((pred == truth).double().mean()) if truth.numel() else float("nan")
