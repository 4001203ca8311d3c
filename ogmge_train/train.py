"""The training loop (SPEC §5): epochs of OGM-GE-modulated SGD, evaluation, checkpoints, resume.

One code path for 1 and N processes (torchrun): every rank streams its own part of the shards,
DDP averages gradients, the modulation all-reduces its batch scores and draws GE noise from a
generator seeded by (seed, global step), so parameters stay bitwise identical across ranks.
Evaluation gathers every rank's predictions, so metrics cover each sample exactly once.

Reproducibility: a checkpoint holds model, optimizer, scheduler, the global RNG states and the
step counter; the data order depends only on (seed, epoch, workers, processes). Resuming after
epoch k therefore replays epochs k+1.. exactly (bit-exact on CPU; on CUDA up to non-deterministic
kernels). Loaders are rebuilt every epoch (workers restart) for that reason: persistent workers
would consume the global RNG differently in a resumed run.
Only rank 0 writes files; events go to ``on_event`` on rank 0 only. Ranks share one file
system (single node, or a shared run folder).

Test hook: with ``OGMGE_PARAM_HASH_DIR`` set, every rank appends the sha256 of its parameters
after each epoch to ``<dir>/rank<r>.jsonl`` (the DDP test compares ranks bitwise).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from avprep.errors import ConfigError

from . import data, dist, modulation, runfolder
from .config import TrainConfig
from .metrics import output_metrics
from .models import AVModel, build_model

__all__ = ["train", "evaluate", "load_run", "load_checkpoint", "select_device", "EVENT_TYPES"]

EVENT_TYPES = ("start", "epoch_start", "step", "eval", "epoch_end", "end")
# Settings a resumed run may change: where and how it runs, and for how long (workers and
# device may change the numbers, but not what the experiment is).
_RESUMABLE = {"epochs", "workers", "device", "out", "shards", "s3_endpoint"}
# Test hook: a folder where every rank writes a hash of its parameters after each epoch.
_PARAM_HASH_ENV = "OGMGE_PARAM_HASH_DIR"

Event = Callable[[dict], None]


# ---------------------------------------------------------------- small helpers

def select_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: CUDA when available; under torchrun each process takes GPU ``LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The GE noise generator of one optimizer step: same seed on every rank, new per step."""
    s = np.random.SeedSequence([seed, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(s[0]) << 32 | int(s[1]))


def _rng_state() -> dict:
    """Global RNG states as tensors and primitives only (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, tuple) else x


# Run-folder files are written through runfolder (one owner: atomic tmp + fsync + rename).
_atomic_write_text = runfolder.atomic_write_text
_atomic_save = runfolder.atomic_save
_json_line = runfolder.json_line
_keep_lines = runfolder.keep_epochs


def load_checkpoint(path) -> dict:
    """A checkpoint dict, loaded safely (``weights_only=True``: tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: one line, not a traceback
        raise ConfigError(f"{path}: not a loadable checkpoint ({type(e).__name__}: {e})") from e


def _param_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- data

def _loader(cfg: TrainConfig, split: str, *, train: bool, epoch: int, info: dist.DistInfo, source=None):
    """A fresh loader per epoch: creating one draws once from the global RNG (DataLoader's base
    seed), so a resumed run consumes the RNG exactly like an uninterrupted one."""
    return data.make_loader(source or cfg.shards, split, train=train, batch_size=cfg.batch_size,
                            frames=cfg.frames, image_size=cfg.image_size, workers=cfg.workers, seed=cfg.seed,
                            epoch=epoch, rank=info.rank, world_size=info.world_size, s3_endpoint=cfg.s3_endpoint,
                            pin_memory=torch.cuda.is_available() and cfg.device != "cpu")


def _read_dataset(cfg: TrainConfig):
    if "://" not in cfg.shards and not (Path(cfg.shards) / "dataset.json").is_file():
        # a wrong local path is a usage error, not a storage failure
        raise ConfigError(f"{cfg.shards}: no dataset.json; --shards must be a folder written by `avprep extract`")
    return data.read_dataset(cfg.shards, s3_endpoint=cfg.s3_endpoint)


def _to(batch: dict, device: torch.device):
    nb = device.type == "cuda"
    return (batch["audio"].to(device, non_blocking=nb), batch["visual"].to(device, non_blocking=nb),
            batch["label"].to(device, non_blocking=nb).long())


def _autocast(cfg: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16")


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def _predict(model: AVModel, loader, device: torch.device, cfg: TrainConfig) -> dict:
    """This rank's logits (fused and unimodal), labels and keys for one pass over ``loader``."""
    model.eval()
    parts: dict[str, list] = {"logits": [], "logits_a": [], "logits_v": [], "labels": [], "keys": []}
    for batch in loader:
        audio, visual, labels = _to(batch, device)
        with _autocast(cfg, device):
            out = model(audio, visual)
        for k in ("logits", "logits_a", "logits_v"):
            if getattr(out, k) is not None:
                parts[k].append(getattr(out, k).float().cpu())
        parts["labels"].append(labels.cpu())
        parts["keys"].extend(batch["key"])
    return {k: (torch.cat(v) if v and k != "keys" else v) for k, v in parts.items()}


def _gather_predictions(local: dict) -> dict:
    """Every rank's predictions, concatenated and sorted by sample key (order-free metrics)."""
    ranks = dist.all_gather_object(local)
    keys = [k for r in ranks for k in r["keys"]]
    order = torch.as_tensor(sorted(range(len(keys)), key=keys.__getitem__), dtype=torch.long)
    out = {"keys": [keys[i] for i in order.tolist()]}
    for k in ("logits", "logits_a", "logits_v", "labels"):
        tensors = [r[k] for r in ranks if isinstance(r[k], torch.Tensor)]
        if tensors:
            out[k] = torch.cat(tensors)[order]
    return out


def _metrics(pred: dict) -> dict:
    """loss, acc, map of the fused logits and acc/map of each modality's unimodal logits."""
    labels = pred.get("labels")
    if labels is None or len(labels) == 0:
        return {}
    return {"loss": F.cross_entropy(pred["logits"], labels).item(), **output_metrics(pred)}


def _evaluate_split(model: AVModel, cfg: TrainConfig, split: str, device, info: dist.DistInfo,
                    source=None) -> dict:
    local = _predict(model, _loader(cfg, split, train=False, epoch=0, info=info, source=source), device, cfg)
    return _metrics(_gather_predictions(local))


def _sync_buffers(model: torch.nn.Module) -> None:
    """Rank 0's BatchNorm (and head) buffers everywhere: each rank's last forward updated its own."""
    for b in model.buffers():
        dist.broadcast(b.data, 0)


# ---------------------------------------------------------------- the loop

class _Run:
    """State of one training run; ``run()`` drives the epochs."""

    def __init__(self, cfg: TrainConfig, resume: bool, on_event: Event | None):
        self.info = dist.env_info()
        self.device = select_device(cfg.device, self.info.local_rank)
        self.info = dist.init(self.device)
        self.out = Path(cfg.out) if cfg.out else None
        if self.out is None:
            raise ConfigError("--out is required: the folder of the run")
        self.emit = on_event if (on_event is not None and self.info.is_main) else (lambda e: None)
        self.dataset = _read_dataset(cfg)
        self.cfg = cfg.with_dataset(self.dataset.name)
        self.resume = resume
        self._check_splits()

    # -- setup

    def _num(self, split: str) -> int:
        sp = self.dataset.splits.get(split)
        return sp.num_samples if sp is not None else 0

    def _check_splits(self) -> None:
        n, batch = self._num("train"), self.cfg.batch_size * self.info.world_size
        if n < batch:
            raise ConfigError(f"{self.cfg.shards}: {n} train samples, fewer than one batch of {batch} "
                              f"({self.info.world_size} process(es)); lower --batch-size")
        self.eval_splits = [s for s in self.cfg.eval_splits if self._num(s) > 0]
        # Model selection uses val only; without one, the last epoch is selected (never test).
        self.select_on = "val" if "val" in self.eval_splits else None

    def _build(self) -> None:
        cfg = self.cfg
        _seed_all(cfg.seed)
        self.model = build_model(cfg.arch, cfg.fusion, len(self.dataset.classes), cfg.modality).to(self.device)
        self.net = self.model
        if self.info.world_size > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.method = modulation.build(cfg.modulation, alpha=cfg.alpha, start_epoch=cfg.modulation_start,
                                       end_epoch=cfg.modulation_end, scope=cfg.modulation_scope, drop_p=cfg.drop_p)
        params = self.model.parameters()
        if cfg.optimizer == "sgd":
            self.opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "adam":
            self.opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
        self.global_step = 0
        self.start_epoch = 0
        self.best = {"epoch": -1, "acc": -math.inf}
        # Every rank runs the same number of full batches (DDP needs it): floor(n / (batch x ranks)).
        self.steps = data.default_steps_per_epoch(self._num("train"), cfg.batch_size, self.info.world_size)

    def _restore(self) -> None:
        ckpt_path = self.out / "last.pt"
        if ckpt_path.is_file():
            self._load(ckpt_path)
        if self.info.is_main:  # lines of epochs after the checkpoint are replayed
            for name in ("metrics.jsonl", "steps.jsonl"):
                _keep_lines(self.out / name, self.start_epoch - 1)

    def _load(self, ckpt_path: Path) -> None:
        ckpt = load_checkpoint(ckpt_path)
        stored = TrainConfig.from_dict(ckpt["config"])
        diff = sorted(k for k in stored.to_dict()
                      if k not in _RESUMABLE and stored.to_dict()[k] != self.cfg.to_dict()[k])
        if diff:
            raise ConfigError(f"{ckpt_path}: cannot resume with different settings: "
                              + ", ".join(f"{k} {stored.to_dict()[k]!r} -> {self.cfg.to_dict()[k]!r}" for k in diff))
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.global_step = int(ckpt["step"])
        self.start_epoch = int(ckpt["epoch"]) + 1
        self.best = dict(ckpt["best"])
        _set_rng_state(ckpt["rng"])

    def _check_folder(self) -> None:
        # every rank checks (same answer everywhere), so none is left waiting at a barrier
        if not self.resume and any((self.out / n).exists() for n in ("last.pt", "metrics.jsonl")):
            raise ConfigError(f"{self.out}: already holds a run; pass --resume to continue it or choose another --out")

    def _prepare_folder(self) -> None:
        if not self.info.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.resume:
            (self.out / "steps.jsonl").unlink(missing_ok=True)
        runfolder.write_config(self.out, self.cfg.to_dict())

    # -- epochs

    def _train_epoch(self, epoch: int) -> dict:
        cfg, dev = self.cfg, self.device
        self.net.train()
        hook = self.method.feature_hook(training=True)
        reduce = dist.all_reduce if self.info.world_size > 1 else None
        # loss*n, correct, correct_a, correct_v, n, then sums of rho_a, rho_v, k_a, k_v
        totals = torch.zeros(9, dtype=torch.float64)
        steps_log = []
        t0 = time.perf_counter()
        loader = _loader(cfg, "train", train=True, epoch=epoch, info=self.info, source=self.dataset)
        for i, batch in enumerate(loader):
            audio, visual, labels = _to(batch, dev)
            with _autocast(cfg, dev):
                out = self.net(audio, visual, feature_hook=hook) if hook else self.net(audio, visual)
            loss = F.cross_entropy(out.logits.float(), labels)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            stats = self.method.after_backward(self.model, out, labels, epoch=epoch, all_reduce=reduce,
                                               generator=_step_generator(cfg.seed, self.global_step, dev))
            self.opt.step()
            self.global_step += 1
            n = len(labels)
            # one host sync for the step's numbers
            step_loss, *correct = torch.stack([loss.detach(), *(_correct(lg, labels) for lg in out[:3])]).tolist()
            totals += torch.tensor([step_loss * n, *correct, n, *(stats[k] for k in modulation.STAT_KEYS)],
                                   dtype=torch.float64)
            steps_log.append({"epoch": epoch, "step": self.global_step, "loss": step_loss, **stats})
            elapsed = time.perf_counter() - t0
            self.emit({"event": "step", "epoch": epoch, "step": i + 1, "steps": self.steps, "loss": step_loss,
                       "acc": float(totals[1] / totals[4]), **stats,
                       "samples_per_s": float(totals[4]) * self.info.world_size / max(elapsed, 1e-9)})
        seconds = time.perf_counter() - t0
        local_steps = len(steps_log)
        # on the training device: NCCL reduces CUDA tensors only; rho/k sums are the same on every rank
        totals = dist.all_reduce(totals.to(dev)).cpu()
        n, w = float(totals[4]), self.info.world_size
        train = {"loss": float(totals[0]) / n, "acc": float(totals[1]) / n}
        if self.model.modality != "visual":
            train["acc_a"] = float(totals[2]) / n
        if self.model.modality != "audio":
            train["acc_v"] = float(totals[3]) / n
        means = {k: float(totals[5 + j]) / (local_steps * w) for j, k in enumerate(modulation.STAT_KEYS)}
        if self.info.is_main:
            runfolder.append_jsonl(self.out / runfolder.STEPS, steps_log)
        return {"train": train, **means, "samples_per_s": n / max(seconds, 1e-9)}

    def _evaluate(self, epoch: int) -> dict:
        _sync_buffers(self.model)
        result = {}
        for split in self.eval_splits:
            self.emit({"event": "eval", "epoch": epoch, "split": split})
            result[split] = _evaluate_split(self.model, self.cfg, split, self.device, self.info, self.dataset)
        return result

    def _checkpoint(self, epoch: int, record: dict) -> bool:
        """Write last.pt (and best.pt when val accuracy improved); returns whether it did."""
        improved = self.select_on is None or record[self.select_on]["acc"] > self.best["acc"]
        if improved:
            acc = record[self.select_on]["acc"] if self.select_on else math.nan
            self.best = {"epoch": epoch, "acc": acc}
        if not self.info.is_main:
            return improved
        ckpt = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "epoch": epoch, "step": self.global_step,
                "config": self.cfg.to_dict(), "classes": list(self.dataset.classes), "rng": _rng_state(),
                "best": dict(self.best)}
        runfolder.append_jsonl(self.out / runfolder.METRICS, [record])
        _atomic_save(ckpt, self.out / runfolder.LAST)
        if improved:
            runfolder.atomic_copy(self.out / runfolder.LAST, self.out / runfolder.BEST)
        return improved

    def _write_summary(self, record_of_best: dict | None, epochs_done: int) -> dict:
        summary = {"selected_epoch": self.best["epoch"],
                   "selection": "val_acc" if self.select_on else "last_epoch",
                   "epochs": epochs_done, "dataset": self.cfg.dataset, "world_size": self.info.world_size,
                   **{s: (record_of_best or {}).get(s, {}) for s in ("val", "test")}}
        if self.info.is_main:
            runfolder.write_summary(self.out, summary)
        return summary

    def _record_of(self, epoch: int) -> dict | None:
        return runfolder.record_of(self.out, epoch)

    def _dump_hash(self, epoch: int) -> None:
        folder = os.environ.get(_PARAM_HASH_ENV)
        if folder:
            with open(Path(folder) / f"rank{self.info.rank}.jsonl", "a") as f:
                f.write(_json_line({"epoch": epoch, "step": self.global_step, "sha256": _param_hash(self.model)}))

    def run(self) -> dict:
        self._check_folder()
        self._build()
        if self.resume:
            self._restore()
        self._prepare_folder()
        cfg = self.cfg
        self.emit({"event": "start", "epochs": cfg.epochs, "start_epoch": self.start_epoch, "steps": self.steps,
                   "world_size": self.info.world_size, "device": str(self.device), "config": cfg.to_dict()})
        summary = None
        for epoch in range(self.start_epoch, cfg.epochs):
            self.emit({"event": "epoch_start", "epoch": epoch, "epochs": cfg.epochs, "steps": self.steps})
            t0, lr = time.perf_counter(), self.opt.param_groups[0]["lr"]
            trained = self._train_epoch(epoch)
            self.sched.step()
            evaluated = self._evaluate(epoch)
            record = {"epoch": epoch, "lr": lr, **trained, **evaluated, "time_s": time.perf_counter() - t0}
            best = self._checkpoint(epoch, record)
            self._dump_hash(epoch)
            if self.info.is_main:
                summary = self._write_summary(self._record_of(self.best["epoch"]), epoch + 1)
            self.emit({"event": "epoch_end", "epoch": epoch, "epochs": cfg.epochs, "record": record, "best": best})
        if summary is None:  # nothing left to run (resumed a finished run)
            summary = self._write_summary(self._record_of(self.best["epoch"]), self.start_epoch) \
                if self.info.is_main else {}
        dist.barrier()
        self.emit({"event": "end", "summary": summary})
        return summary


def _correct(logits, labels) -> torch.Tensor:
    """Number of right arg-max predictions, as a float tensor on the device (0 for a missing modality)."""
    if logits is None:
        return torch.zeros((), device=labels.device)
    return (logits.detach().argmax(1) == labels).sum().float()


def train(cfg: TrainConfig, *, resume: bool = False, on_event: Event | None = None) -> dict:
    """Train per ``cfg`` into ``cfg.out``; returns the summary (selected epoch, its val/test metrics).

    ``resume=True`` continues from ``out/last.pt`` when it exists (settings must match, except
    epochs/workers/device/locations); without it an existing run folder is an error, so a typo
    never overwrites results. Under torchrun this joins the process group (and leaves it at the
    end); the caller sees the same summary on rank 0 and an empty dict elsewhere.
    ``on_event(dict)`` is called on rank 0 with ``{"event": kind, ...}``:
    ``start`` (epochs, start_epoch, steps, world_size, device, config), ``epoch_start`` (epoch,
    epochs, steps), ``step`` (epoch, step in epoch, steps, loss, acc so far, rho_a, rho_v, k_a,
    k_v, samples_per_s over all ranks), ``eval`` (epoch, split), ``epoch_end`` (epoch, record:
    the metrics.jsonl line, best: whether best.pt was updated), ``end`` (summary). An exception
    raised by ``on_event`` stops training; the last checkpoint stays resumable.
    """
    owns_group = not dist.is_distributed()
    try:
        return _Run(cfg, resume, on_event).run()
    finally:
        if owns_group:
            dist.shutdown()


# ---------------------------------------------------------------- runs on disk

def load_run(run_dir, which: str = "best", device: str = "cpu") -> tuple[AVModel, TrainConfig, dict]:
    """The model of checkpoint ``which`` ("best" or "last") in eval mode, its config and the checkpoint."""
    if which not in ("best", "last"):
        raise ConfigError(f"--which must be best or last, not {which!r}")
    run_dir = Path(run_dir)
    ckpt = load_checkpoint(run_dir / f"{which}.pt")
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = build_model(cfg.arch, cfg.fusion, len(ckpt["classes"]), cfg.modality)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg, ckpt


def evaluate(run_dir, split: str = "test", which: str = "best", *, shards: str | None = None,
             device: str = "auto", workers: int | None = None, batch_size: int | None = None) -> dict:
    """Metrics of a saved checkpoint on ``split`` (same keys as metrics.jsonl's val/test entries).

    Uses the run's own shards unless ``shards`` is given. Works under torchrun too (every rank
    evaluates its part, the predictions are gathered).
    """
    owns_group = not dist.is_distributed()
    info = dist.env_info()
    dev = select_device(device, info.local_rank)
    info = dist.init(dev)
    try:
        model, cfg, _ = load_run(run_dir, which, device=dev)
        changes = {k: v for k, v in (("shards", shards), ("workers", workers), ("batch_size", batch_size))
                   if v is not None}
        cfg = dataclasses.replace(cfg, **changes)
        return _evaluate_split(model, cfg, split, dev, info)
    finally:
        if owns_group:
            dist.shutdown()
