"""``modality-drop``: the paper's Table 2 comparison (modality dropout before fusion).

In training, each sample independently loses a modality with probability ``drop_p``. Which one
is set by ``drop_modality``: a modality's name (the paper's two Table 2 rows: ``audio``,
``visual``: always that modality), or ``either`` (one of the M modalities uniformly per dropped
sample, a fair coin for two; never all). The dropped modality's pooled features are set to zero
(no 1/(1-p) rescaling, as in ModDrop), or, with ``drop_at="input"`` (the paper's Modality-Drop),
its input: the spectrogram or frames the encoder receives (``transform_inputs``), so the dropped
sample also reaches the encoder's BatchNorm statistics as zeros. Evaluation sees everything.
Gradients are not modulated. Draws use torch's global RNG on the batch's device (seeded by the
loop); ranks need not agree, since each rank drops within its own samples. Works with any number
of modalities.
"""
import torch

from ..names import DROP_AT
from .base import Method


class ModalityDrop(Method):
    name = "modality-drop"
    options = ("drop_p", "drop_modality", "drop_at")

    def __init__(self, *, drop_p: float = 0.5, drop_modality: str = "either", drop_at: str = "features", **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= drop_p < 1.0:
            raise ValueError(f"drop_p must be in [0, 1), not {drop_p}")
        if drop_at not in DROP_AT:
            raise ValueError(f"drop_at must be one of {', '.join(DROP_AT)}, not {drop_at!r}")
        self.drop_p, self.drop_modality, self.drop_at = float(drop_p), drop_modality, drop_at

    def setup(self, modalities):
        if self.drop_modality not in ("either", *modalities.names):
            raise ValueError(f"drop_modality must be either or one of {', '.join(modalities.names)}, "
                             f"not {self.drop_modality!r}")
        return None

    def uses(self, hook: str) -> bool:
        if hook in ("transform_inputs", "transform_features"):      # one of the two, by drop_at
            return hook == f"transform_{'inputs' if self.drop_at == 'input' else 'features'}"
        return super().uses(hook)

    def _keep(self, names: list[str], n: int, device) -> list[torch.Tensor]:
        """Per modality, the bool (n,) mask of the samples that keep it."""
        u = torch.rand(2, n, device=device)
        drop = u[0] < self.drop_p
        if self.drop_modality == "either":      # which modality a dropped sample loses (two: u < 0.5 the first)
            which = (u[1] * len(names)).long().clamp(max=len(names) - 1)
        else:                                   # the second draw is still made: one RNG use for all
            which = torch.full_like(drop, names.index(self.drop_modality), dtype=torch.long)
        return [~(drop & (which == i)) for i in range(len(names))]

    @staticmethod
    def _apply(tensors: dict, keep: list[torch.Tensor]) -> dict:
        return {u: x * k.to(x.dtype).view(-1, *[1] * (x.dim() - 1)) for (u, x), k in zip(tensors.items(), keep)}

    def transform_inputs(self, inputs, *, training: bool, step=None):
        if not training or self.drop_p == 0.0 or self.drop_at != "input" or step is None:
            return inputs
        names = list(step.modalities.names)
        mine = {u: inputs[u] for u in names}
        dropped = self._apply(mine, self._keep(names, mine[names[0]].shape[0], mine[names[0]].device))
        return {**inputs, **dropped}

    def transform_features(self, features, *, training: bool, step=None):
        if not training or self.drop_p == 0.0 or self.drop_at != "features":
            return features
        names = list(features)
        first = features[names[0]]
        return self._apply(features, self._keep(names, first.shape[0], first.device))
