"""Accuracy and macro mAP (README: Training), for the fused output and each modality's unimodal logits.

mAP follows the OGM-GE evaluation: per class, the average precision of the softmax probability
of that class against one-vs-rest targets, with sklearn's definition
``AP = sum_n (R_n - R_{n-1}) P_n`` over distinct score thresholds (tied scores form one
threshold, no interpolation); classes without a positive sample are skipped; the mean is
unweighted. Numpy only, no sklearn.
"""
from __future__ import annotations

import numpy as np
import torch


def _np(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def accuracy(logits, labels) -> float:
    """Fraction of rows whose arg-max equals the label (ties: lowest index, as ``argmax``)."""
    logits, labels = _np(logits), _np(labels).astype(np.int64)
    if len(labels) == 0:
        return float("nan")
    return float((logits.argmax(axis=1) == labels).mean())


def average_precision(scores, targets) -> float:
    """sklearn ``average_precision_score`` for one class: ``scores`` (N,), binary ``targets`` (N,)."""
    scores, targets = _np(scores).astype(np.float64), _np(targets).astype(bool)
    order = np.argsort(-scores, kind="mergesort")
    scores, targets = scores[order], targets[order]
    # the last index of each run of equal scores is one threshold
    ends = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tps = np.cumsum(targets)[ends]
    precision = tps / (ends + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def mean_average_precision(scores, labels, num_classes: int | None = None) -> float:
    """Macro mAP of class ``scores`` (N, C) (probabilities) against integer ``labels`` (N,).

    Classes with no positive in ``labels`` are skipped (their AP is undefined); NaN when none is
    left. Pass probabilities, not logits: a per-sample softmax changes the ranking within a class.
    """
    scores, labels = _np(scores), _np(labels).astype(np.int64)
    num_classes = scores.shape[1] if num_classes is None else num_classes
    aps = [average_precision(scores[:, c], labels == c) for c in range(num_classes) if np.any(labels == c)]
    return float(np.mean(aps)) if aps else float("nan")


def classification_metrics(logits, labels, prefix: str = "") -> dict[str, float]:
    """``{prefix+"acc", prefix+"map"}`` of logits (mAP over their softmax)."""
    logits = torch.as_tensor(logits).detach().float().cpu()
    probs = logits.softmax(dim=1)
    return {f"{prefix}acc": accuracy(logits, labels), f"{prefix}map": mean_average_precision(probs, labels)}


OUTPUT_KEYS = (("logits", ""), ("logits_a", "_a"), ("logits_v", "_v"))


def output_metrics(pred: dict) -> dict[str, float]:
    """``acc, map`` of ``pred["logits"]`` and ``acc_a, map_a, acc_v, map_v`` of the unimodal
    logits, each only when ``pred`` has that key, against ``pred["labels"]``."""
    result = {}
    for key, suffix in OUTPUT_KEYS:
        if key in pred:
            m = classification_metrics(pred[key], pred["labels"])
            result[f"acc{suffix}"], result[f"map{suffix}"] = m["acc"], m["map"]
    return result


class OutputAccumulator:
    """Collects an epoch's logits (fused and unimodal), labels and loss, then computes metrics.

    ``update(out, labels, loss=None)`` per batch (``out`` a ``ModelOutput``); ``compute()`` gives
    ``loss, acc, map, acc_a, map_a, acc_v, map_v`` (the unimodal keys only when the model has
    that modality; loss only when given). ``tensors()`` exposes the concatenated arrays so a
    distributed loop can gather them before computing.
    """

    KEYS = OUTPUT_KEYS

    def __init__(self):
        self.parts: dict[str, list[torch.Tensor]] = {k: [] for k, _ in self.KEYS}
        self.labels: list[torch.Tensor] = []
        self.loss_sum, self.count, self.has_loss = 0.0, 0, False

    def update(self, out, labels, loss=None) -> None:
        for key, _ in self.KEYS:
            value = getattr(out, key)
            if value is not None:
                self.parts[key].append(value.detach().float().cpu())
        self.labels.append(torch.as_tensor(labels).detach().cpu())
        n = len(self.labels[-1])
        if loss is not None:
            self.loss_sum += float(loss) * n
            self.has_loss = True
        self.count += n

    def tensors(self) -> dict[str, torch.Tensor]:
        """``labels`` and each collected ``logits*`` key, concatenated over the epoch."""
        out = {k: torch.cat(v) for k, v in self.parts.items() if v}
        out["labels"] = torch.cat(self.labels) if self.labels else torch.zeros(0, dtype=torch.long)
        return out

    def compute(self) -> dict[str, float]:
        result = {"loss": self.loss_sum / self.count} if self.has_loss else {}
        return {**result, **output_metrics(self.tensors())}
