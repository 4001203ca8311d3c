"""Accuracy and macro mAP against hand computations."""
import math

import numpy as np
import pytest
import torch

from ogmge_train.metrics import (
    OutputAccumulator,
    accuracy,
    average_precision,
    classification_metrics,
    mean_average_precision,
)
from ogmge_train.models import ModelOutput


def test_accuracy():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    assert accuracy(logits, torch.tensor([0, 1, 0, 2])) == 0.5
    assert accuracy(logits.numpy(), [0, 1, 2, 0]) == 1.0


def test_average_precision_by_hand():
    # precision at each positive: 1/1, 2/3, 3/5
    assert average_precision([0.9, 0.8, 0.7, 0.6, 0.5], [1, 0, 1, 0, 1]) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    # tied scores are one threshold (sklearn): {0.8, 0.8} gives P = 1/3 at R = 0.5; then P = 2/4 at R = 1
    assert average_precision([0.9, 0.8, 0.8, 0.3], [0, 1, 0, 1]) == pytest.approx(0.5 * 1 / 3 + 0.5 * 2 / 4)
    assert average_precision([0.1, 0.2, 0.3], [0, 0, 1]) == 1.0
    assert average_precision([0.3, 0.2, 0.1], [0, 0, 1]) == pytest.approx(1 / 3)


def _brute_force_ap(scores, targets):
    """Mean over positives of the precision among all samples scoring at least as high."""
    scores, targets = np.asarray(scores), np.asarray(targets, bool)
    return np.mean([targets[scores >= s].mean() for s in scores[targets]])


def test_average_precision_matches_brute_force_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 6, 40) / 5          # many ties
        targets = rng.random(40) < 0.3
        targets[0] = True
        assert average_precision(scores, targets) == pytest.approx(_brute_force_ap(scores, targets), abs=1e-12)


def test_macro_map_skips_absent_classes():
    scores = np.array([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1]])
    labels = np.array([0, 1, 1, 0])  # class 2 has no positive: skipped, not counted as 0
    ap0 = average_precision(scores[:, 0], labels == 0)   # 0.7+, 0.6-, 0.4-, 0.2+ -> (1 + 2/4) / 2
    ap1 = average_precision(scores[:, 1], labels == 1)   # 0.7-, 0.5+, 0.3+, 0.2- -> (1/2 + 2/3) / 2
    assert ap0 == pytest.approx(0.75) and ap1 == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert mean_average_precision(scores, labels) == pytest.approx((ap0 + ap1) / 2)
    assert math.isnan(mean_average_precision(scores[:0], labels[:0]))


def test_classification_metrics_rank_softmax_probabilities():
    # the same logits ranked per class before and after the softmax differ: row 1's class-0 logit is
    # higher, but its softmax probability is lower because row 1 is confident in class 1
    logits = torch.tensor([[1.0, 0.0], [2.0, 5.0]])
    labels = torch.tensor([0, 1])
    m = classification_metrics(logits, labels)
    assert m["acc"] == 1.0 and m["map"] == 1.0
    assert mean_average_precision(logits, labels) == pytest.approx((0.5 + 1.0) / 2)


def test_accumulator():
    acc = OutputAccumulator()
    g = torch.Generator().manual_seed(0)
    batches = []
    for n in (3, 5):
        logits = torch.randn(n, 4, generator=g)
        la, lv = torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g)
        labels = torch.randint(0, 4, (n,), generator=g)
        acc.update(ModelOutput(logits, la, lv, None, None), labels, loss=torch.tensor(float(n)))
        batches.append((logits, la, lv, labels))
    cat = [torch.cat(x) for x in zip(*batches)]
    result = acc.compute()
    assert set(result) == {"loss", "acc", "map", "acc_a", "map_a", "acc_v", "map_v"}
    assert result["loss"] == pytest.approx((3 * 3 + 5 * 5) / 8)
    for logits, suffix in zip(cat[:3], ("", "_a", "_v")):
        assert result["acc" + suffix] == accuracy(logits, cat[3])
        assert result["map" + suffix] == mean_average_precision(logits.softmax(1), cat[3])
    assert torch.equal(acc.tensors()["labels"], cat[3])

    audio_only = OutputAccumulator()
    audio_only.update(ModelOutput(cat[0], cat[0], None, None, None), cat[3])
    assert set(audio_only.compute()) == {"acc", "map", "acc_a", "map_a"}
