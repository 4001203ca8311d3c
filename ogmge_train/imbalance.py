"""The imbalance measure of BalanceBenchmark (``balancemm/evaluation/modalitys.py``,
``Calculate_Shapley``): each modality's Shapley value of the fused accuracy.

``v(S)`` is the accuracy of the fused prediction when the inputs of the modalities outside S are
zeros (the model in eval mode sees a zero spectrogram / zero normalised frames, as the benchmark
pads them), fused by the run's evaluation rule (``Balancer.predict``: a method's own test-time
fusion counts); for M modalities

    phi_u = sum_{S not containing u} |S|! (M - |S| - 1)! / M! (v(S + {u}) - v(S)),

for two ``phi_a = (v({a}) - v({})) / 2 + (v({a, v}) - v({v})) / 2``, so
``sum_u phi_u = v(all) - v({})``. The evaluation loop computes the 2^M - 1 other coalitions'
logits next to every batch (``coalition_logits``) and ``shapley`` turns the gathered predictions
into ``shapley_<tag>`` of the split's metrics (``shapley_a``, ``shapley_v``: metrics.jsonl,
summary.json).
"""
from __future__ import annotations

from itertools import combinations
from math import factorial

import torch

PREFIX = "coalition:"     # prediction keys: the kept modalities' names joined by "+" after it


def coalitions(names) -> list[tuple[str, ...]]:
    """Every proper subset of ``names`` (the kept modalities), the empty one included."""
    return [c for r in range(len(names)) for c in combinations(names, r)]


def key(kept: tuple[str, ...]) -> str:
    return PREFIX + "+".join(kept)


@torch.no_grad()
def coalition_logits(plug, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused logits (``plug.predict``) for every proper coalition of ``plug.modalities``'
    modalities, the others' inputs zeroed (empty for one modality); the caller holds eval mode
    and autocast. ``plug``: an ``ogmge_train.plugin.Balancer``."""
    names = plug.modalities.names
    if len(names) < 2:
        return {}
    return {key(kept): plug.predict(plug.modalities.run(
                {u: (x if u in kept else torch.zeros_like(x)) for u, x in inputs.items()}, plug.eval_hook()))
            for kept in coalitions(names)}


def shapley(pred: dict, names, tags: dict[str, str]) -> dict[str, float]:
    """``{"shapley_<tag>": phi_u}`` from gathered predictions (``logits`` of every modality,
    ``labels`` and the coalition logits); empty when the coalitions were not evaluated."""
    names = tuple(names)
    if len(names) < 2 or any(not isinstance(pred.get(k), torch.Tensor)
                             for k in ("logits", *(key(c) for c in coalitions(names)))):
        return {}
    labels = pred["labels"]

    def v(kept) -> float:
        logits = pred["logits"] if len(kept) == len(names) else pred[key(tuple(u for u in names if u in kept))]
        return (logits.argmax(dim=1) == labels).double().mean().item()

    m, out = len(names), {}
    for u in names:
        others = [w for w in names if w != u]
        out[f"shapley_{tags[u]}"] = sum(
            factorial(len(s)) * factorial(m - len(s) - 1) / factorial(m) * (v({*s, u}) - v(set(s)))
            for r in range(m) for s in combinations(others, r))
    return out
