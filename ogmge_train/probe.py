"""Linear probes (the paper's footnote 1): how much class information a frozen encoder holds.

The encoder of one modality of a trained run is frozen (eval mode: BatchNorm running stats),
its pooled features are extracted once per split with the evaluation transforms, and a fresh
linear classifier is fitted on the train features. Fitting is full-batch L-BFGS on L2-regularised
cross-entropy over standardised features from a zero initialisation: the problem is convex, so
the result depends on the features only (no seed, no learning-rate tuning). The L2 strength is
chosen on the validation split from a small grid when one exists.

Trade-offs: features are held in memory (N × 512 floats: ~100 MB for 50k clips), and the
eval transform means the probe never sees augmented frames — cheaper and deterministic, but
a slightly easier fit than training with augmentation would be.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import runfolder
from .errors import ConfigError
from .metrics import accuracy, mean_average_precision

__all__ = ["ProbeResult", "extract_features", "fit_linear", "evaluate_linear", "probe", "MODALITIES",
           "L2_GRID"]

MODALITIES = ("audio", "visual")
L2_GRID = (1e-3, 1e-2, 1e-1, 1.0)
# on_progress(stage, done, total): stage "features:<split>" (samples) or "fit" (grid points)
OnProgress = Callable[[str, int, int | None], None]


@dataclass
class ProbeResult:
    modality: str
    path: Path                   # RUN/probe_<modality>.json
    results: dict                # what the json holds


@torch.no_grad()
def extract_features(encoder: nn.Module, batches: Iterable[dict], modality: str, *,
                     device="cpu", on_batch: Callable[[int], None] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (N, D) float32 on CPU and labels (N,) of every sample in ``batches``.

    Rows are sorted by sample key so that the result does not depend on loader order
    (workers interleave shards)."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, not {modality!r}")
    encoder.eval()
    feats, labels, keys = [], [], []
    for batch in batches:
        x = batch[modality].to(device, non_blocking=True)
        feats.append(encoder(x).float().cpu())
        labels.append(torch.as_tensor(batch["label"]).long().cpu())
        keys.extend(batch["key"])
        if on_batch is not None:
            on_batch(len(batch["key"]))
    if not feats:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return torch.cat(feats)[order], torch.cat(labels)[order]


class LinearProbe(nn.Module):
    """Standardisation (fixed from the train features) followed by a linear layer."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.fc = nn.Linear(mean.numel(), num_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return self.fc((x - self.mean) / self.std)


def fit_linear(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, l2: float = 1e-3,
               steps: int = 100) -> LinearProbe:
    """Fit ``LinearProbe`` on (x, y) by full-batch L-BFGS (``steps`` iterations, strong Wolfe
    line search) on mean cross-entropy + ``l2/2 * ||W||^2``. Deterministic for given inputs."""
    x = x.double()
    mean = x.mean(0)
    std = x.std(0, unbiased=False).clamp_min(1e-6)    # dead (all-zero) ReLU features stay 0
    model = LinearProbe(mean, std, num_classes).double()
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=steps, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")
    y = y.long()

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + 0.5 * l2 * model.fc.weight.pow(2).sum()
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)    # a problem this small only pays thread hand-offs (10x slower on 2)
    try:
        with torch.enable_grad():
            opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    return model.float()


@torch.no_grad()
def evaluate_linear(model: LinearProbe, x: torch.Tensor, y: torch.Tensor) -> dict:
    """``{"acc", "map", "n"}`` of the probe on (x, y) (NaN metrics for an empty split)."""
    if len(y) == 0:
        return {"acc": float("nan"), "map": float("nan"), "n": 0}
    logits = model(x.float())
    return {"acc": accuracy(logits, y), "map": mean_average_precision(logits.softmax(1), y,
                                                                       model.fc.out_features),
            "n": int(len(y))}


def select_and_fit(train: tuple, val: tuple | None, num_classes: int, *, steps: int = 100,
                   grid=L2_GRID, on_fit: Callable[[int, int], None] | None = None
                   ) -> tuple[LinearProbe, float, dict[str, float]]:
    """Fit one probe per L2 strength in ``grid`` and keep the best on ``val`` (ties: the
    stronger regularisation); without a val split, the middle of the grid. Returns the
    probe, its L2 strength and the val accuracy of every grid point."""
    if val is None or len(val[1]) == 0:
        l2 = grid[len(grid) // 2]
        if on_fit:
            on_fit(1, 1)
        return fit_linear(train[0], train[1], num_classes, l2=l2, steps=steps), l2, {}
    best: tuple[float, LinearProbe, float] | None = None
    scores = {}
    for i, l2 in enumerate(grid):
        model = fit_linear(train[0], train[1], num_classes, l2=l2, steps=steps)
        scores[repr(l2)] = acc = evaluate_linear(model, *val)["acc"]
        if best is None or acc >= best[0]:
            best = (acc, model, l2)
        if on_fit:
            on_fit(i + 1, len(grid))
    assert best is not None, "an empty L2 grid"
    return best[1], best[2], scores


def probe(run_dir, modality: str, *, split: str = "test", which: str = "best", steps: int = 100,
          batch_size: int = 64, workers: int = 0, device: str = "cpu",
          on_progress: OnProgress | None = None) -> ProbeResult:
    """Probe the frozen ``modality`` encoder of the run in ``run_dir`` (checkpoint ``which``:
    "best" or "last"); writes ``run_dir/probe_<modality>.json`` and returns its content.

    Features come from the run's own shards (config.json ``shards``) with the evaluation
    transforms for every split, the probe is fitted on ``train``, its L2 strength picked on
    ``val`` and it is scored on ``split``. Raises ConfigError when the run has no such encoder
    or its shards no train split.
    """
    # the training loop is heavy; import it only when probing
    from .data import make_loader, read_dataset
    from .train import load_run

    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, not {modality!r}")
    run_dir = Path(run_dir)
    runfolder.read_config(run_dir)      # a clear error for a folder that is not a run
    model, cfg, ckpt = load_run(run_dir, which, device=device)
    encoder = model.encoder(modality)
    if encoder is None:
        raise ConfigError(f"{run_dir}: the run was trained with modality={cfg.modality!r}; "
                         f"it has no {modality} encoder to probe")
    emit = on_progress or (lambda stage, done, total: None)
    info = read_dataset(cfg.shards, s3_endpoint=cfg.s3_endpoint)

    feats = {}
    for s in dict.fromkeys(("train", "val", split)):
        if s not in info.splits or info.splits[s].num_samples == 0:
            continue
        assert cfg.frames is not None       # load_run's config went through with_dataset
        loader = make_loader(info, s, train=False, batch_size=batch_size, frames=cfg.frames,
                             image_size=cfg.image_size, workers=workers)
        total, done = loader.num_samples, 0
        emit(f"features:{s}", 0, total)

        def on_batch(n, s=s, total=total):
            nonlocal done
            done += n
            emit(f"features:{s}", done, total)

        feats[s] = extract_features(encoder, loader, modality, device=device, on_batch=on_batch)
    if "train" not in feats:
        raise ConfigError(f"{cfg.shards}: no train samples to fit a probe on")

    num_classes = model.num_classes
    lin, l2, grid_scores = select_and_fit(feats["train"], feats.get("val"), num_classes, steps=steps,
                                          on_fit=lambda i, n: emit("fit", i, n))
    results = {
        "modality": modality, "which": which, "checkpoint_epoch": ckpt.get("epoch"),
        "feature_dim": int(feats["train"][0].shape[1]), "l2": l2, "l2_val_acc": grid_scores,
        "steps": steps, "eval_split": split,
        **{s: evaluate_linear(lin, *xy) for s, xy in feats.items()},
    }
    return ProbeResult(modality, runfolder.write_probe(run_dir, modality, results), results)
