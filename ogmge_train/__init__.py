"""ogmge_train: stream avprep shards into audio-visual models and train them with OGM-GE (README: Training).

Public API (imported lazily, so ``import ogmge_train.config`` stays cheap)::

    from ogmge_train import TrainConfig, resolve, evaluate, load_run
    from ogmge_train.train import train
    cfg = resolve("demo", shards="OUT", out="RUN")
    summary = train(cfg, on_event=print)          # RUN/config.json, metrics.jsonl, best.pt, ...
    evaluate("RUN", split="test", which="best")

A method in a training loop of one's own (README: Plug-in API)::

    from ogmge_train.plugin import Balancer, Modalities, Output

``train`` (the function) is not re-exported here: the name belongs to the submodule
``ogmge_train.train``, and shadowing it would make ``import ogmge_train.train`` ambiguous.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "TrainConfig": "config", "resolve": "config", "PRESETS": "config",
    "evaluate": "train", "load_run": "train", "load_checkpoint": "train",
    "build_model": "models", "ModelOutput": "models", "AVModel": "models",
    "read_dataset": "data", "make_loader": "data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
