"""The training loop (README: Training): epochs of OGM-GE-modulated SGD, evaluation, checkpoints, resume.

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

The run is ``_Setup`` (process group, data, model, optimiser, method, resume), ``_EpochLoop``
(one training epoch, one evaluation) and ``_Recording`` (selection, checkpoints, summary), driven
by ``_run``. Every run-folder write goes through ``Recorder`` (one small class, so the run-folder module can
replace it). ``on_epoch_end`` is called on every rank after each epoch (the DDP test hashes
parameters through it).
Finiteness: a non-finite loss or gradient stops the run with ``NonFiniteError`` naming epoch and
step (``on_nonfinite="skip"``: the step is skipped, BatchNorm statistics restored); a checkpoint is
never written from non-finite parameters; non-finite evaluation logits raise rather than change
which epoch is selected.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from avprep import shardformat as sf

from . import data, dist, frameworks, imbalance, localisation, modulation, names, runfolder
from .config import RESUMABLE_FIELDS, TrainConfig
from .errors import ConfigError, NonFiniteError, PeerLostError, RunFolderError, TrainError
from .frameworks import Model
from .metrics import output_metrics
from .plugin import Balancer

__all__ = ["EVENT_TYPES", "evaluate", "load_checkpoint", "load_run", "select_device", "train"]

EVENT_TYPES = ("run_folder", "start", "epoch_start", "step", "eval", "eval_step", "epoch_end", "end")

Event = Callable[[dict], None]
EpochHook = Callable[[dict], None]


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


def _rng_state() -> dict:
    """Global RNG states as tensors and primitives only (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
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


# ---------------------------------------------------------------- run-folder files

class Recorder:
    """Every file of a run folder that training writes: config.json, metrics.jsonl, steps.jsonl,
    last.pt/best.pt and summary.json (rank 0 only; the other ranks get ``enabled=False``).
    The files themselves are owned by ``runfolder`` (names, atomic writes, torn-line readers)."""

    def __init__(self, out: Path, enabled: bool):
        self.out, self.enabled = out, enabled

    def has_history(self) -> bool:
        return any((self.out / n).exists() for n in (runfolder.METRICS, runfolder.BEST))

    def has_last(self) -> bool:
        return (self.out / runfolder.LAST).is_file()

    def prepare(self, cfg: TrainConfig, resume: bool) -> None:
        if not self.enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if not resume:
            (self.out / runfolder.STEPS).unlink(missing_ok=True)
        runfolder.write_config(self.out, cfg.to_dict())

    def truncate_after(self, last_epoch: int) -> None:
        """Lines of epochs after the checkpoint we resume from are replayed."""
        if self.enabled:
            for name in (runfolder.METRICS, runfolder.STEPS):
                runfolder.keep_epochs(self.out / name, last_epoch)

    def append_steps(self, steps: list[dict]) -> None:
        if self.enabled:
            runfolder.append_jsonl(self.out / runfolder.STEPS, steps)

    def append_metrics(self, record: dict) -> None:
        if self.enabled:
            runfolder.append_jsonl(self.out / runfolder.METRICS, [record])

    def save_checkpoint(self, ckpt: dict, best: bool) -> None:
        if not self.enabled:
            return
        runfolder.atomic_save(ckpt, self.out / runfolder.LAST)
        if best:
            runfolder.atomic_copy(self.out / runfolder.LAST, self.out / runfolder.BEST)

    def write_summary(self, summary: dict) -> None:
        if self.enabled:
            runfolder.write_summary(self.out, summary)

    def record_of(self, epoch: int) -> dict | None:
        return runfolder.record_of(self.out, epoch)


def load_checkpoint(path) -> dict:
    """A checkpoint dict, loaded safely (``weights_only=True``: tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: one line, not a traceback
        raise ConfigError(f"{path}: not a loadable checkpoint ({type(e).__name__}: {e})") from e


def _check_dataset(ckpt: dict, fingerprint: dict, ckpt_path, action: str) -> list[str]:
    """Refuse (``ConfigError``, one line) to ``action`` a checkpoint on a dataset whose name, class
    names or input settings differ from the one it was trained on (labels would silently mean
    other classes); returns the notes on its clips (same classes, other split sizes or keys).
    A checkpoint from before fingerprints is checked on its class list."""
    recorded = ckpt.get("dataset") or {"classes": list(ckpt.get("classes", []))}
    changes, clips = data.fingerprint_changes(recorded, fingerprint)
    if changes:
        raise ConfigError(f"{ckpt_path}: cannot {action} on {fingerprint['name'] or 'these shards'}: the dataset "
                          f"differs from the one this run was trained on: {'; '.join(changes)}")
    return clips


def _param_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())   # 0-dim too
    return h.hexdigest()


def _optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _build_model(cfg: TrainConfig, num_classes: int, *, encoder_weights: bool = True) -> Model:
    """``--model av``: ours (``models.AVModel``); else a framework's (``ogmge_train.frameworks``)."""
    return frameworks.build(cfg, num_classes, encoder_weights=encoder_weights)


# TrainConfig fields build() takes as named arguments; every other field is offered to the method,
# which keeps those its class lists in ``options``
_NAMED = ("modulation", "alpha", "modulation_start", "modulation_end", "fusion")


def _balancer(cfg: TrainConfig, model: Model) -> Balancer:
    """The run's method on ``model`` (its heads, if any, added to the model): the plug-in API's
    ``Balancer``, the same object a loop of one's own uses."""
    method = modulation.build(cfg.modulation, alpha=cfg.alpha or 0.0, start_epoch=cfg.modulation_start,
                              end_epoch=cfg.modulation_end,
                              fusion=cfg.fusion if cfg.modality == "both" and cfg.model == "av" else None,
                              **{k: v for k, v in cfg.to_dict().items() if k not in _NAMED})
    return Balancer(method, model.modalities(cfg.modulation_scope), seed=cfg.seed)


# ---------------------------------------------------------------- data

def _loader(cfg: TrainConfig, split: str, *, train: bool, epoch: int, info: dist.DistInfo, source=None,
            on_bad_sample: Callable[[str, str, str], None] | None = None):
    """A fresh loader per epoch: creating one draws once from the global RNG (DataLoader's base
    seed), so a resumed run consumes the RNG exactly like an uninterrupted one. On CUDA frames
    travel as uint8 (4x fewer bytes) and are normalised on the device (``data.to_device``)."""
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    assert cfg.frames is not None       # with_dataset filled it
    return data.make_loader(source or cfg.shards, split, train=train, batch_size=cfg.batch_size,
                            frames=cfg.frames, image_size=cfg.image_size, workers=cfg.workers, seed=cfg.seed,
                            epoch=epoch, rank=info.rank, world_size=info.world_size, s3_endpoint=cfg.s3_endpoint,
                            pin_memory=cuda, visual_dtype=torch.uint8 if cuda else torch.float32,
                            on_bad_sample=on_bad_sample, frame_pick=cfg.frame_pick,
                            segments=cfg.task == "localisation")


def _read_dataset(cfg: TrainConfig):
    if "://" not in cfg.shards and not (Path(cfg.shards) / sf.DATASET).is_file():
        # a wrong local path is a usage error, not a storage failure
        raise ConfigError(f"{cfg.shards}: no {sf.DATASET}; --shards must be a folder written by `avprep extract`")
    return data.read_dataset(cfg.shards, s3_endpoint=cfg.s3_endpoint)


def _autocast(cfg: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16")


def _to(batch: dict, device: torch.device):
    """(audio, visual, labels) on ``device``; uint8 frames are normalised there."""
    return data.to_device(batch, device)


# ---------------------------------------------------------------- evaluation

Progress = Callable[[int, int], None]


@torch.no_grad()
def _predict(plug: Balancer, loader, device: torch.device, cfg: TrainConfig, on_progress: Progress | None = None,
             ) -> dict:
    """This rank's logits (fused by the method's evaluation rule, and unimodal), the Shapley
    coalitions' fused logits (``imbalance``), labels and keys for one pass over ``loader``;
    ``on_progress(batches done, batches)`` after each batch."""
    plug.modalities.model.eval()
    parts: dict[str, list] = {"logits": [], "logits_a": [], "logits_v": [], "labels": [], "keys": []}
    for i, batch in enumerate(loader, 1):
        audio, visual, labels = _to(batch, device)
        labels, keys = localisation.rows(plug.modalities.model, batch, labels, list(batch["key"]))
        inputs = {"audio": audio, "visual": visual}
        with _autocast(cfg, device):
            out = plug.evaluate(plug.modalities.run(inputs, plug.eval_hook()))
            coalitions = imbalance.coalition_logits(plug, inputs)
        parts["logits"].append(out.logits.float().cpu())
        for k, lg in coalitions.items():
            parts.setdefault(k, []).append(lg.float().cpu())
        for k, u in (("logits_a", "audio"), ("logits_v", "visual")):
            if u in out.unimodal:
                parts[k].append(out.unimodal[u].float().cpu())
        parts["labels"].append(labels.cpu())
        parts["keys"].extend(keys)
        if on_progress is not None:
            on_progress(i, len(loader))
    return {k: (torch.cat(v) if v and k != "keys" else v) for k, v in parts.items()}


def _gather_predictions(local: dict) -> dict:
    """Every rank's predictions, concatenated and sorted by sample key (order-free metrics)."""
    ranks = dist.all_gather_object(local)
    keys = [k for r in ranks for k in r["keys"]]
    order = torch.as_tensor(sorted(range(len(keys)), key=keys.__getitem__), dtype=torch.long)
    out: dict[str, Any] = {"keys": [keys[i] for i in order.tolist()]}
    for k in ranks[0]:
        if k == "keys":
            continue
        tensors = [r[k] for r in ranks if isinstance(r[k], torch.Tensor)]
        if tensors:
            out[k] = torch.cat(tensors)[order]
    return out


def _metrics(pred: dict, split: str = "", modalities=None) -> dict:
    """loss, acc, map of the fused logits, acc/map of each modality's unimodal logits and, given
    ``modalities`` (the model side), each one's Shapley value (``imbalance``).

    Non-finite logits raise ``NonFiniteError`` naming the samples: a NaN must never decide which
    epoch is selected (the loader drops non-finite inputs; this guards the model side too)."""
    labels = pred.get("labels")
    if labels is None or len(labels) == 0:
        return {}
    finite = torch.isfinite(pred["logits"]).all(dim=1)
    if not bool(finite.all()):
        bad = [pred["keys"][i] for i in (~finite).nonzero().flatten().tolist()]
        raise NonFiniteError(f"{split or 'evaluation'}: non-finite logits for {len(bad)} sample(s), "
                             f"e.g. {', '.join(map(str, bad[:3]))}")
    shapley = imbalance.shapley(pred, modalities.names, modalities.tags) if modalities is not None else {}
    return {"loss": F.cross_entropy(pred["logits"], labels).item(), **output_metrics(pred), **shapley}


def _evaluate_split(plug: Balancer, cfg: TrainConfig, split: str, device, info: dist.DistInfo,
                    source=None, on_bad_sample=None, on_progress: Progress | None = None) -> dict:
    loader = _loader(cfg, split, train=False, epoch=0, info=info, source=source, on_bad_sample=on_bad_sample)
    local = _predict(plug, loader, device, cfg, on_progress)
    return _metrics(_gather_predictions(local), split, plug.modalities)


def _sync_buffers(model: torch.nn.Module) -> None:
    """Rank 0's BatchNorm (and head) buffers everywhere: each rank's last forward updated its own."""
    for b in model.buffers():
        dist.broadcast(b.data, 0)


# ---------------------------------------------------------------- the loop

@dataclass
class EpochStats:
    """Training totals of one epoch on this rank (summed over ranks by ``reduced``)."""

    loss_sum: float = 0.0          # sum over samples of the loss
    correct: float = 0.0           # right fused predictions
    correct_a: float = 0.0         # right audio-only (unimodal logits) predictions
    correct_v: float = 0.0
    samples: float = 0.0
    steps: float = 0.0             # optimizer steps taken
    skipped: float = 0.0           # steps skipped for a non-finite loss or gradient
    rho_a: float = 0.0             # sums over steps of the method's statistics
    rho_v: float = 0.0
    k_a: float = 0.0
    k_v: float = 0.0
    update_norm_a: float = 0.0     # sums over steps of ||theta_after - theta_before|| of each encoder
    update_norm_v: float = 0.0

    def add_step(self, loss: float, n: int, correct: list[float], stats: dict, norms: list[float]) -> None:
        self.loss_sum += loss * n
        self.correct += correct[0]
        self.correct_a += correct[1]
        self.correct_v += correct[2]
        self.samples += n
        self.steps += 1
        for k in modulation.STAT_KEYS:
            setattr(self, k, getattr(self, k) + stats[k])
        self.update_norm_a += norms[0]
        self.update_norm_v += norms[1]

    def reduced(self, device: torch.device) -> EpochStats:
        """Sums over ranks (on the training device: NCCL reduces CUDA tensors only)."""
        names = [f.name for f in dataclasses.fields(self)]
        t = dist.all_reduce(torch.tensor([getattr(self, n) for n in names], dtype=torch.float64, device=device))
        return EpochStats(**dict(zip(names, t.cpu().tolist())))


class _Setup:
    """Everything a run needs before its first epoch: process group and device, dataset and splits,
    model (DDP-wrapped as ``net``), method, optimiser and scheduler, and the state restored by
    ``--resume``. ``setup()`` does the part that touches the run folder."""

    def __init__(self, cfg: TrainConfig, resume: bool, on_event: Event | None):
        self.info = dist.env_info()
        self.device = select_device(cfg.device, self.info.local_rank)
        self.info = dist.init(self.device)
        if resume and not cfg.out:
            raise ConfigError("--resume needs --out RUN: the run folder to continue")
        self.emit = on_event if (on_event is not None and self.info.is_main) else (lambda e: None)
        self.dataset = _read_dataset(cfg)
        self.fingerprint = self.dataset.fingerprint()      # checks the indexes: no leak, labels agree
        meta = self.dataset.meta
        spec = meta.config.get("spec", {})
        seconds = spec.get("duration")
        self.cfg = cfg.with_dataset(self.dataset.name, meta.spec_shape, spec.get("kind"),
                                    sf.count_segments(seconds) if isinstance(seconds, int | float) else None)
        self.resume = resume
        self._locks = contextlib.ExitStack()
        self._warned: set[str] = set()
        self.dataset.on_warning = self.warning
        self._check_splits()
        self.made = not self.cfg.out
        if self.made:
            self.cfg = dataclasses.replace(self.cfg, out=self._new_run_folder())
        self.emit({"event": "run_folder", "out": self.cfg.out, "new": self.made})
        self.out = Path(self.cfg.out)
        self.rec = Recorder(self.out, self.info.is_main)

    def _new_run_folder(self) -> str:
        """No --out: rank 0 creates runs/<dataset>-<fusion>-<method>-<n>, every rank gets its name."""
        made = problem = None
        if self.info.is_main:
            cfg = self.cfg
            try:
                made = str(runfolder.new_run_folder(runfolder.run_stem(cfg.dataset, cfg.fusion, cfg.modulation,
                                                                       cfg.modality)))
            except RunFolderError as e:
                problem = str(e)
        made, problem = dist.all_gather_object((made, problem))[0]
        if problem is not None:
            raise RunFolderError(problem)
        return made

    @property
    def global_step(self) -> int:
        """Optimizer steps taken (the balancer counts them: its noise generators are seeded by it)."""
        return self.plug.step

    @global_step.setter
    def global_step(self, value: int) -> None:
        self.plug.step = value

    def bad_sample(self, shard: str, key: str, problem: str) -> None:
        """A corrupt sample the loader skipped (the loader raises ``DataError`` past its threshold)."""
        self.emit({"event": "bad_sample", "shard": shard, "key": key, "problem": problem})

    def warning(self, message: str) -> None:
        """Said once per run (each epoch's loaders may repeat it)."""
        if message not in self._warned:
            self._warned.add(message)
            self.emit({"event": "warning", "message": message})

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
        # Model selection on val (or, with select_on="test", on test as the reference code does);
        # without that split the last epoch is selected.
        self.select_on = self.cfg.select_on if self.cfg.select_on in self.eval_splits else None

    def _build(self) -> None:
        cfg = self.cfg
        _seed_all(cfg.seed)
        self.model = _build_model(cfg, len(self.dataset.classes)).to(self.device)
        self.plug = _balancer(cfg, self.model)      # before DDP and the optimizer: it may add heads
        self.net: torch.nn.Module = self.model
        if self.info.world_size > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.opt = _optimizer(cfg, self.model.parameters())
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
        self.global_step = 0
        self.start_epoch = 0
        self.best = {"epoch": -1, "acc": -math.inf}
        # Every rank runs the same number of full batches (DDP needs it): floor(n / (batch x ranks)).
        self.steps = data.default_steps_per_epoch(self._num("train"), cfg.batch_size, self.info.world_size)

    def _lock(self) -> None:
        """Rank 0 holds the run folder's writer lock for the whole run (a second run into the
        same --out is refused) and removes what a killed writer left half-written; every rank
        learns whether it got the lock, so none is left waiting at a collective."""
        refused = None
        if self.info.is_main:
            try:
                self._locks.enter_context(runfolder.writer_lock(self.out))
                runfolder.remove_temp(self.out)
            except TrainError as e:
                refused = (type(e), str(e))
        if self.info.world_size > 1:
            refused = dist.all_gather_object(refused)[0]
        if refused is not None:
            raise refused[0](refused[1])

    def close(self, failed: bool = False) -> None:
        """Release the writer lock; after a failure before the first step, remove the run folder
        this run made (it holds nothing a user could want)."""
        self._locks.close()
        stepped = hasattr(self, "plug") and self.global_step > 0
        if failed and self.made and self.info.is_main and not stepped and runfolder.remove_unused_run_folder(self.out):
            with contextlib.suppress(Exception):      # an observer's failure must not hide the run's own error
                self.emit({"event": "warning", "message": f"{self.out}: removed; the run stopped before its first "
                           "step"})

    def _check_folder(self) -> None:
        # every rank checks (same answer everywhere), so none is left waiting at a barrier
        if not self.resume and (self.rec.has_last() or (self.out / "metrics.jsonl").exists()):
            raise ConfigError(f"{self.out}: already holds a run; pass --resume to continue it or choose another --out")
        self.first_lost = False
        if self.resume and not self.rec.has_last() and self.rec.has_history():
            later = any(r.get("epoch") != 0 for r in runfolder.read_metrics(self.out))
            if later or (self.out / runfolder.BEST).exists():
                raise RunFolderError(f"{self.out}: has results (metrics.jsonl or best.pt) but no last.pt to resume "
                                     "from; move them away to start over, or choose another --out")
            # killed between epoch 0's metrics line and its first checkpoint: nothing to keep
            self.first_lost = True

    def _restore(self) -> None:
        if self.rec.has_last():
            self._load(self.out / "last.pt")
        elif self.first_lost:
            self.emit({"event": "warning", "message": f"{self.out}: epoch 0 was recorded but its checkpoint was "
                       "never written (the run was stopped while saving it); starting again from epoch 0"})
        self.rec.truncate_after(self.start_epoch - 1)

    def _load(self, ckpt_path: Path) -> None:
        ckpt = load_checkpoint(ckpt_path)
        stored = TrainConfig.from_dict(ckpt["config"])
        diff = sorted(k for k in stored.to_dict()
                      if k not in RESUMABLE_FIELDS and stored.to_dict()[k] != self.cfg.to_dict()[k])
        if diff:
            raise ConfigError(f"{ckpt_path}: cannot resume with different settings: "
                              + ", ".join(f"{k} {stored.to_dict()[k]!r} -> {self.cfg.to_dict()[k]!r}" for k in diff))
        clips = _check_dataset(ckpt, self.fingerprint, ckpt_path, "resume")
        if clips:
            self.emit({"event": "warning", "message": f"{self.cfg.shards}: same classes, but other clips than "
                       f"{ckpt_path} was trained on ({'; '.join(clips)}); continuing"})
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.plug.method.load_state_dict(ckpt.get("method", {}))
        self.global_step = int(ckpt["step"])
        self.start_epoch = int(ckpt["epoch"]) + 1
        self.best = dict(ckpt["best"])
        _set_rng_state(ckpt["rng"])
        if self.info.is_main and self.best["epoch"] == ckpt["epoch"]:
            # killed between last.pt and its copy: best.pt must be this epoch's too
            runfolder.atomic_copy(ckpt_path, self.out / runfolder.BEST)

    def setup(self) -> None:
        self._build()
        self._lock()
        self._check_folder()
        if self.resume:
            self._restore()
        self.rec.prepare(self.cfg, self.resume)

class _EpochLoop:
    """One training epoch (method hooks, forward/backward, finiteness check, optimizer step, named
    totals) and one evaluation, on the objects of a ``_Setup``."""

    def __init__(self, setup: _Setup):
        self.s = setup

    def _begin_epoch(self, epoch: int) -> None:
        s = self.s

        def keyed(loader_epoch: int):
            loader = _loader(s.cfg, "train", train=True, epoch=loader_epoch, info=s.info, source=s.dataset,
                             on_bad_sample=s.bad_sample)
            for batch in loader:
                audio, visual, labels = _to(batch, s.device)
                labels, keys = localisation.rows(s.model, batch, labels, list(batch["key"]))
                yield {"audio": audio, "visual": visual}, labels, keys

        def batches(limit: int):
            for i, b in enumerate(keyed(epoch)):
                if i >= limit:
                    break
                yield b[:2]
        s.plug.begin_epoch(epoch, steps=s.steps, batches=batches, keyed_batches=keyed,
                           make_optimizer=lambda params: _optimizer(s.cfg, params), epochs=s.cfg.epochs,
                           on_event=s.emit)

    def _finite(self, loss: torch.Tensor) -> torch.Tensor:
        """Whether the loss and every gradient are finite, as a 0-dim bool tensor (no host sync)."""
        s = self.s
        grads = [p.grad for p in s.model.parameters() if p.grad is not None]
        norms = torch.stack([loss.detach().float(), *torch._foreach_norm(grads)]) if grads else loss.detach()
        return torch.isfinite(norms).all()

    def train_epoch(self, epoch: int) -> dict:
        """One training epoch, a ``_train_batch`` per batch: the epoch's metrics (steps.jsonl appended)."""
        s = self.s
        self._begin_epoch(epoch)
        s.net.train()
        totals, steps_log = EpochStats(), []
        updates = _UpdateNorms(s.plug.modalities)
        t0 = time.perf_counter()
        loader = _loader(s.cfg, "train", train=True, epoch=epoch, info=s.info, source=s.dataset,
                         on_bad_sample=s.bad_sample)
        for i, batch in enumerate(loader):
            step = self._train_batch(epoch, i, batch, updates)
            if step is None:
                totals.skipped += 1
                continue
            step_loss, n, correct, stats, norms = step
            totals.add_step(step_loss, n, correct, stats, norms)
            steps_log.append({"epoch": epoch, "step": s.global_step, "loss": step_loss, **stats})
            elapsed = time.perf_counter() - t0
            s.emit({"event": "step", "epoch": epoch, "step": i + 1, "steps": s.steps, "loss": step_loss,
                    "acc": totals.correct / totals.samples, **stats,
                    "samples_per_s": totals.samples * s.info.world_size / max(elapsed, 1e-9)})
        seconds = time.perf_counter() - t0
        metrics = self._train_metrics(totals.reduced(s.device), seconds)
        s.rec.append_steps(steps_log)
        return metrics

    def _train_batch(self, epoch: int, i: int, batch: dict, updates: _UpdateNorms):
        """One optimizer step on ``batch`` (the whole step, rows, method hooks, forward, backward,
        surgery and optimizer, is the plug-in API's): ``(loss, samples, [correct fused, audio,
        visual], stats, [update norm audio, visual])``, or None when ``on_nonfinite="skip"`` skipped
        it (the model's buffers restored). A non-finite step otherwise raises ``NonFiniteError``."""
        s = self.s
        cfg, dev = s.cfg, s.device
        skip = cfg.on_nonfinite == "skip"
        audio, visual, labels = _to(batch, dev)
        labels, keys = localisation.rows(s.model, batch, labels, list(batch["key"]))
        saved = [b.clone() for b in s.model.buffers()] if skip else None
        finite: list[torch.Tensor] = []     # per backward of this step

        def check(loss: torch.Tensor) -> bool:
            finite.append(self._finite(loss))
            return bool(finite[-1]) if skip else True   # skipping needs the answer before the update: one sync
        updates.before()
        result = s.plug.train_step({"audio": audio, "visual": visual}, labels, s.opt, keys=keys,
                                   model=s.net, autocast=lambda: _autocast(cfg, dev), on_backward=check)
        if result is None:
            assert saved is not None        # only a skipping run skips a step
            for b, kept in zip(s.model.buffers(), saved):
                b.copy_(kept)
            return None
        out, labels = result.out, result.labels
        stats = {**modulation.UNIT_STATS, **result.stats}    # a unimodal model reports 1.0 for the other
        # one host sync for the step's numbers; a non-finite step stops the run here, before
        # anything is written (the parameters in memory are lost, last.pt is intact)
        step_loss, *correct, ok, norm_a, norm_v = torch.stack([
            result.loss.detach(), *(_correct(lg, labels) for lg in (out.logits, out.unimodal.get("audio"),
                                                                     out.unimodal.get("visual"))),
            torch.stack(finite).all().float(), *updates.after()]).tolist()
        if not ok:
            raise NonFiniteError(
                f"{s.out}: non-finite loss or gradient in epoch {epoch}, step {i + 1} (global step "
                f"{s.global_step}); stopped, last.pt holds the last finite epoch "
                "(--on-nonfinite skip skips such steps)")
        return step_loss, len(labels), correct, stats, [norm_a, norm_v]

    def _train_metrics(self, t: EpochStats, seconds: float) -> dict:
        """metrics.jsonl's ``train`` part, the epoch means of the step stats, and the throughput."""
        n = max(t.samples, 1.0)
        train = {"loss": t.loss_sum / n if t.samples else math.nan, "acc": t.correct / n}
        if self.s.model.modality != "visual":
            train["acc_a"] = t.correct_a / n
        if self.s.model.modality != "audio":
            train["acc_v"] = t.correct_v / n
        if t.skipped:
            train["skipped_steps"] = int(t.skipped)
        means = {k: getattr(t, k) / max(t.steps, 1.0) for k in (*modulation.STAT_KEYS, *_UpdateNorms.KEYS)}
        return {"train": train, **means, "samples_per_s": t.samples / max(seconds, 1e-9)}

    def evaluate(self, epoch: int) -> dict:
        s = self.s
        _sync_buffers(s.model)
        result = {}
        for split in s.eval_splits:
            s.emit({"event": "eval", "epoch": epoch, "split": split})

            def progress(done: int, total: int, split: str = split) -> None:
                s.emit({"event": "eval_step", "epoch": epoch, "split": split, "done": done, "total": total})

            result[split] = _evaluate_split(s.plug, s.cfg, split, s.device, s.info, s.dataset,
                                            on_bad_sample=s.bad_sample, on_progress=progress)
        return result


class _Recording:
    """What an epoch leaves behind: model selection, checkpoints, metrics and summary (through the
    setup's ``Recorder``; files on rank 0 only)."""

    def __init__(self, setup: _Setup):
        self.s = setup

    def checkpoint(self, epoch: int, record: dict) -> bool:
        """Write last.pt (and best.pt when the selection split's accuracy improved); returns whether
        best improved."""
        s = self.s
        bad = [n for n, t in [*s.model.named_parameters(), *s.model.named_buffers()]
               if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise NonFiniteError(f"{s.out}: non-finite values in {bad[0]} (and {len(bad) - 1} more) after "
                                 f"epoch {epoch}; not saved, last.pt holds the last finite epoch")
        # an epoch without evaluation (--eval-every) is never selected, except without a val split
        improved = s.select_on is None or (s.select_on in record and record[s.select_on]["acc"] > s.best["acc"])
        if improved:
            acc = record[s.select_on]["acc"] if s.select_on else math.nan
            s.best = {"epoch": epoch, "acc": acc}
        if s.info.is_main:
            ckpt = {"model": s.model.state_dict(), "optimizer": s.opt.state_dict(),
                    "scheduler": s.sched.state_dict(), "epoch": epoch, "step": s.global_step,
                    "config": s.cfg.to_dict(), "classes": list(s.dataset.classes), "dataset": s.fingerprint,
                    "rng": _rng_state(), "best": dict(s.best), "method": s.plug.method.state_dict()}
            s.rec.append_metrics(record)
            s.rec.save_checkpoint(ckpt, improved)
        return improved

    def summary(self, epochs_done: int) -> dict:
        s = self.s
        record_of_best = s.rec.record_of(int(s.best["epoch"])) or {}
        summary = {"selected_epoch": s.best["epoch"],
                   "selection": f"{s.select_on}_acc" if s.select_on else "last_epoch",
                   "selection_label": names.SELECTION_LABELS[s.select_on or "last"],
                   "epochs": epochs_done, "dataset": s.cfg.dataset, "world_size": s.info.world_size,
                   "split_registry": s.dataset.meta.raw.get("split_registry"),     # the published split used
                   **{split: record_of_best.get(split, {}) for split in ("val", "test")}}
        s.rec.write_summary(summary)
        return summary


def _run(s: _Setup, on_epoch_end: EpochHook | None) -> dict:
    """Setup, then the epochs: train, step the scheduler, evaluate, record."""
    s.setup()
    loop, rec = _EpochLoop(s), _Recording(s)
    cfg = s.cfg
    s.emit({"event": "start", "epochs": cfg.epochs, "start_epoch": s.start_epoch, "steps": s.steps,
            "world_size": s.info.world_size, "device": str(s.device), "config": cfg.to_dict()})
    summary = None
    for epoch in range(s.start_epoch, cfg.epochs):
        s.emit({"event": "epoch_start", "epoch": epoch, "epochs": cfg.epochs, "steps": s.steps})
        t0, lr = time.perf_counter(), s.opt.param_groups[0]["lr"]
        trained = loop.train_epoch(epoch)
        s.sched.step()
        evaluated = loop.evaluate(epoch) if _evaluates(cfg, epoch) else {}
        record = {"epoch": epoch, "lr": lr, **trained, **evaluated, "time_s": time.perf_counter() - t0}
        best = rec.checkpoint(epoch, record)
        if on_epoch_end is not None:
            on_epoch_end({"epoch": epoch, "step": s.global_step, "rank": s.info.rank, "model": s.model})
        if s.info.is_main:
            summary = rec.summary(epoch + 1)
        s.emit({"event": "epoch_end", "epoch": epoch, "epochs": cfg.epochs, "record": record, "best": best})
    if summary is None:  # nothing left to run (resumed a finished run)
        summary = rec.summary(s.start_epoch) if s.info.is_main else {}
    dist.barrier()
    s.emit({"event": "end", "summary": summary})
    return summary


class _UpdateNorms:
    """``update_norm_a``/``update_norm_v`` of one step: ``||theta_after - theta_before||_2`` over all
    parameters of each encoder (the modulation's effect on the update, issue 20; 0 for a missing
    encoder). Costs one copy of the encoder parameters in memory and a copy, a subtraction and
    a norm of them per step (BENCHMARKS.md: OGM-GE overhead)."""

    KEYS = ("update_norm_a", "update_norm_v")

    def __init__(self, modalities):
        self.params = [modalities.params(u) if u in modalities.names else [] for u in ("audio", "visual")]
        with torch.no_grad():
            self.saved = [[p.detach().clone() for p in ps] for ps in self.params]

    @torch.no_grad()
    def before(self) -> None:
        for saved, ps in zip(self.saved, self.params):
            if ps:
                torch._foreach_copy_(saved, [p.detach() for p in ps])

    @torch.no_grad()
    def after(self) -> list[torch.Tensor]:
        norms = []
        for saved, ps in zip(self.saved, self.params):
            if not ps:
                norms.append(torch.zeros((), device=self._device()))
                continue
            torch._foreach_sub_(saved, [p.detach() for p in ps])
            norms.append(torch.stack(torch._foreach_norm(saved)).norm().float())
        return norms

    def _device(self):
        return next(p.device for ps in self.params for p in ps)


def _evaluates(cfg: TrainConfig, epoch: int) -> bool:
    """Whether ``epoch`` is evaluated: every ``eval_every``-th epoch and the last one."""
    return (epoch + 1) % cfg.eval_every == 0 or epoch == cfg.epochs - 1


def _correct(logits, labels) -> torch.Tensor:
    """Number of right arg-max predictions, as a float tensor on the device (0 for a missing modality)."""
    if logits is None:
        return torch.zeros((), device=labels.device)
    return (logits.detach().argmax(1) == labels).sum().float()


def train(cfg: TrainConfig, *, resume: bool = False, on_event: Event | None = None,
          on_epoch_end: EpochHook | None = None) -> dict:
    """Train per ``cfg`` into ``cfg.out``; returns the summary (selected epoch, its val/test metrics).

    ``resume=True`` continues from ``out/last.pt`` when it exists (settings must match, except
    epochs/workers/device/locations); without it an existing run folder is an error, so a typo
    never overwrites results. Under torchrun this joins the process group (and leaves it at the
    end); the caller sees the same summary on rank 0 and an empty dict elsewhere.
    Without ``cfg.out`` the run gets a new folder, ``runs/<dataset>-<fusion>-<method>-<n>``
    (``runfolder.new_run_folder``); a run that fails before its first step removes that folder
    again (``runfolder.remove_unused_run_folder``: only its config and lock are in it).
    ``on_event(dict)`` is called on rank 0 with ``{"event": kind, ...}``: ``run_folder`` (out,
    new: whether this run made it; before anything is written), ``start`` (epochs, start_epoch,
    steps, world_size, device, config), ``epoch_start`` (epoch,
    epochs, steps), ``step`` (epoch, step in epoch, steps, loss, acc so far, rho_a, rho_v, k_a,
    k_v, samples_per_s over all ranks), ``eval`` (epoch, split), ``eval_step`` (epoch, split,
    done, total: rank 0's evaluation batches), ``epoch_end`` (epoch, record:
    the metrics.jsonl line, best: whether best.pt was updated), ``bad_sample`` (shard, key, problem:
    a corrupt sample rank 0's loader skipped), ``method_progress`` (method, task, done, total,
    eta_s: a method's own work before an epoch, e.g. gradient-blending's weight estimate, one unit
    per batch of its model copies), ``warning`` (message: said once, e.g. a resume on shards
    holding other clips than the run's), ``end`` (summary). An exception
    raised by ``on_event`` stops training; the last checkpoint stays resumable.
    ``on_epoch_end(dict)`` is called on every rank after each epoch's checkpoint with ``epoch``,
    ``step`` (global), ``rank`` and ``model`` (the unwrapped model; e.g. to compare ranks).
    Raises ``NonFiniteError`` on a non-finite loss or gradient (unless ``cfg.on_nonfinite`` is
    "skip"), ``RunFolderError`` when ``resume`` finds results but no last.pt, ``RunWriteError``
    when a run file cannot be written.
    """
    owns_group = not dist.is_distributed()
    setup, failed = None, True
    try:
        setup = _Setup(cfg, resume, on_event)
        summary = _run(setup, on_epoch_end)
        failed = False
        return summary
    except RuntimeError as e:
        if setup is not None and setup.info.world_size > 1 and dist.is_peer_loss(e):
            raise PeerLostError(f"rank {setup.info.rank}: lost contact with another training process "
                                f"({dist.peer_loss_reason(e)}); the last finished epoch is saved in "
                                f"{setup.out}: rerun with --resume to continue") from None
        raise
    finally:
        if setup is not None:
            setup.close(failed)
        if owns_group:
            dist.shutdown()


# ---------------------------------------------------------------- runs on disk

def load_run(run_dir, which: str = "best", device: str = "cpu") -> tuple[Model, TrainConfig, dict]:
    """The model of checkpoint ``which`` ("best" or "last") in eval mode, its config and the checkpoint."""
    _, model, cfg, ckpt = _load_run(run_dir, which, device)
    return model, cfg, ckpt


def _load_run(run_dir, which: str, device) -> tuple[Balancer, Model, TrainConfig, dict]:
    """``load_run`` plus the run's method (its heads are part of the model; its state, e.g. a
    test-time fusion rule's, is restored)."""
    if which not in ("best", "last"):
        raise ConfigError(f"--which must be best or last, not {which!r}")
    run_dir = Path(run_dir)
    path = run_dir / f"{which}.pt"
    ckpt = load_checkpoint(path)
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = _build_model(cfg, len(ckpt["classes"]), encoder_weights=False)
    plug = _balancer(cfg, model)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:      # edited or foreign: its tensors do not fit the model it describes
        first = str(e).strip().splitlines()
        raise ConfigError(f"{path}: its weights do not fit the model its config describes "
                          f"({first[-1].strip() if first else e})") from None
    plug.method.load_state_dict(ckpt.get("method", {}))
    return plug, model.to(device).eval(), cfg, ckpt


def evaluate(run_dir, split: str = "test", which: str = "best", *, shards: str | None = None,
             device: str = "auto", workers: int | None = None, batch_size: int | None = None,
             on_progress: Progress | None = None) -> dict:
    """Metrics of a saved checkpoint on ``split`` (same keys as metrics.jsonl's val/test entries).

    Uses the run's own shards unless ``shards`` is given. Works under torchrun too (every rank
    evaluates its part, the predictions are gathered). ``on_progress(batches done, batches)``
    is called on rank 0 as its batches are scored.
    """
    owns_group = not dist.is_distributed()
    info = dist.env_info()
    dev = select_device(device, info.local_rank)
    info = dist.init(dev)
    try:
        plug, _, cfg, ckpt = _load_run(run_dir, which, device=dev)
        changes: dict[str, Any] = {k: v for k, v in (("shards", shards), ("workers", workers),
                                                      ("batch_size", batch_size))
                   if v is not None}
        cfg = dataclasses.replace(cfg, **changes)
        dataset = _read_dataset(cfg)
        _check_dataset(ckpt, dataset.fingerprint(), Path(run_dir) / f"{which}.pt", "evaluate")
        return _evaluate_split(plug, cfg, split, dev, info, source=dataset,
                               on_progress=on_progress if info.is_main else None)
    finally:
        if owns_group:
            dist.shutdown()
