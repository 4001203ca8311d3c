"""Run by torchrun from tests/test_ddp.py: one training run whose ``on_epoch_end`` callback
appends each rank's parameter hash to ``<hashes>/rank<r>.jsonl``.

usage: ddp_worker.py SHARDS OUT HASHES MODULATION FUSION [SETTING=JSON ...]
(settings override the test defaults below, e.g. ``workers=2``)
"""
import json
import sys
from pathlib import Path

from ogmge_train import train as train_mod
from ogmge_train.config import resolve


def main(shards, out, hashes, modulation, fusion, *settings):
    def on_epoch_end(e):
        with open(Path(hashes) / f"rank{e['rank']}.jsonl", "a") as f:
            f.write(json.dumps({"epoch": e["epoch"], "step": e["step"],
                                "sha256": train_mod._param_hash(e["model"])}) + "\n")

    options = dict(epochs=2, batch_size=4, image_size=32, device="cpu", workers=0, modulation=modulation,
                   fusion=fusion, optimizer="sgd", lr=0.05, opm_p_exe=1.0, gb_super_epoch=1, gb_holdout=0.2)
    options.update({k: json.loads(v) for k, v in (s.split("=", 1) for s in settings)})
    cfg = resolve("demo", shards=shards, out=out, **options)
    summary = train_mod.train(cfg, on_epoch_end=on_epoch_end)
    if summary:
        print(json.dumps(summary))


if __name__ == "__main__":
    main(*sys.argv[1:])
