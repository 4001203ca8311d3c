"""Pieces shared by the `ogmge-train` commands: the training options (``train`` and ``sweep``),
the progress receiver of ``ogmge_train.train``'s events, the epoch line and result tables.

No command is defined here, so the command modules import this one and never each other.
"""
from __future__ import annotations

import dataclasses
import math
import time

import click

from avprep import shardformat as sf
from ogmge_train import report as report_lib
from ogmge_train.config import CHOICES, PRESETS, TrainConfig
from ogmge_train.names import METHOD_HELP
from ogmge_train.runfolder import RUNS_DIR

from . import _ui

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
_PRESET_NOTE = "a --preset may change it"


def choice(name: str) -> click.Choice:
    return click.Choice(CHOICES[name])


def _default(name: str, note: str = _PRESET_NOTE) -> str:
    return f"{_DEFAULTS[name]}; {note}"


# (flag, click keyword arguments) of every training setting; `sweep` takes them all but --seed.
# Settings default to None ("not given") so that --preset and a resumed config.json can fill them;
# the help shows what a run gets when neither does.
_TRAIN_OPTIONS: list[tuple[str, dict]] = [
    ("--shards", dict(help=f"Shard folder or URL (http(s)://, s3://) holding {sf.DATASET} (from `avprep extract`).",
                      show_default="required unless --resume")),
    ("--out", dict(type=click.Path(file_okay=False), help="Run folder to create (or resume).",
                   show_default=f"a new {RUNS_DIR}/<dataset>-<fusion>-<method>-<n>")),
    ("--preset", dict(type=click.Choice(list(PRESETS)), show_default="none: the paper's settings below",
                      help="Settings of a paper experiment, or `demo` (small CPU encoders); flags override it.")),
    ("--fusion", dict(type=choice("fusion"), show_default=_default("fusion"),
                      help="Fusion head (README: Training).")),
    ("--modulation", dict(type=choice("modulation"), show_default=_default("modulation"),
                          help="Balancing method applied during training: "
                               + "; ".join(f"{k}: {v}" for k, v in METHOD_HELP.items()) + ".")),
    ("--alpha", dict(type=float,
                     show_default="per dataset: 0.8 CREMA-D and Kinetics-Sounds, 0.1 VGGSound, 0.2 AVE, "
                                  "0.3 others (sources: README)",
                     help="OGM strength: k = 1 - tanh(alpha * rho) for the dominant modality.")),
    ("--modulation-start", dict(type=int, show_default=_default("modulation_start"),
                                help="First modulated epoch (0-based, inclusive).")),
    ("--modulation-end", dict(type=int, show_default=_default("modulation_end"),
                              help="Last modulated epoch (inclusive).")),
    ("--modulation-scope", dict(type=choice("modulation_scope"), show_default=_default("modulation_scope"),
                                help="Gradients modulated: encoder conv weights (reference code) or all encoder "
                                     "parameters.")),
    ("--ge-noise", dict(type=choice("ge_noise"), show_default=_default("ge_noise"),
                        help="GE noise: code (N(0, std(g)) per tensor, as the official code) or paper (the "
                             "mini-batch gradient covariance of eq. 13; one extra backward per step).")),
    ("--drop-p", dict(type=float, show_default=_default("drop_p"),
                      help="Probability that a sample loses a modality (--modulation modality-drop).")),
    ("--drop-modality", dict(type=choice("drop_modality"), show_default=_default("drop_modality"),
                             help="modality-drop: the modality a dropped sample loses (the paper's two rows: audio, "
                                  "visual; either: a fair coin).")),
    ("--drop-at", dict(type=choice("drop_at"), show_default=_default("drop_at"),
                       help="modality-drop: zero the dropped modality's pooled features, or its input (the paper's "
                            "Modality-Drop; reproduce's Table 2 rows use input).")),
    ("--opm-q-base", dict(type=float, show_default=_default("opm_q_base"),
                          help="opm/opm-ge: base drop probability of the dominant modality (TPAMI q_base).")),
    ("--opm-lam", dict(type=float, show_default=_default("opm_lam"),
                       help="opm/opm-ge: growth of the drop probability with the discrepancy (TPAMI lam).")),
    ("--opm-p-exe", dict(type=float, show_default=_default("opm_p_exe"),
                         help="opm/opm-ge: probability that a step drops at all (TPAMI p_exe).")),
    ("--pmr-alpha", dict(type=float, show_default=_default("pmr_alpha"),
                         help="pmr: weight of the weaker modality's prototype loss.")),
    ("--pmr-momentum", dict(type=float, show_default=_default("pmr_momentum"),
                            help="pmr: prototype momentum (weight of the previous prototype).")),
    ("--pmr-entropy", dict(type=float, show_default=_default("pmr_entropy"),
                           help="pmr: mu of the prototypical entropy regularisation of the dominant modality "
                                "(PMR paper eq. 13; not in its released code); 0 turns it off.")),
    ("--pmr-entropy-epochs", dict(type=int, show_default=_default("pmr_entropy_epochs"),
                                  help="pmr: PER applies in the first this many epochs from --modulation-start "
                                       "(the paper: 'the first few epochs', no number).")),
    ("--gb-super-epoch", dict(type=int, show_default=_default("gb_super_epoch"),
                              help="gradient-blending: epochs between two estimates of the loss weights.")),
    ("--gb-holdout", dict(type=float, show_default=_default("gb_holdout"),
                          help="gradient-blending: fraction of train held out to estimate the weights.")),
    ("--agm-alpha", dict(type=float, show_default=_default("agm_alpha"),
                         help="agm: strength of the gradient coefficients.")),
    ("--relearn-lambda", dict(type=float, show_default=_default("relearn_lambda"),
                              help="relearning: re-initialisation weight tanh(lambda * purity gap).")),
    ("--relearn-every", dict(type=int, show_default=_default("relearn_every"),
                             help="relearning: epochs between two re-initialisations.")),
    ("--relearn-times", dict(type=int, show_default=_default("relearn_times"),
                             help="relearning: number of re-initialisations.")),
    ("--relearn-holdout", dict(type=float, show_default=_default("relearn_holdout"),
                               help="relearning: fraction of train held out (never trained on) for the diagnosis.")),
    ("--inforeg-beta-a", dict(type=float, show_default=_default("inforeg_beta_a"),
                              help="inforeg: proximal strength on the audio encoder when audio dominates.")),
    ("--inforeg-beta-v", dict(type=float, show_default=_default("inforeg_beta_v"),
                              help="inforeg: proximal strength on the visual encoder when visual dominates.")),
    ("--inforeg-window", dict(type=float, show_default=_default("inforeg_window"),
                              help="inforeg: the prime learning window lasts while the information gain rate "
                                   "exceeds this.")),
    ("--cml-lambda", dict(type=float, show_default=_default("cml_lambda"),
                          help="cml: weight of the confidence penalty.")),
    ("--mmcosine-scale", dict(type=float, show_default=_default("mmcosine_scale"),
                              help="mmcosine: scale of the cosine logits.")),
    ("--recon-w1", dict(type=float, show_default=_default("recon_w1"),
                        help="reconboost: weight of the learner's own cross-entropy in the boosting loss.")),
    ("--recon-w2", dict(type=float, show_default=_default("recon_w2"),
                        help="reconboost: weight of the term against the other modalities' ensemble.")),
    ("--recon-boost-rate", dict(type=float, show_default=_default("recon_boost_rate"),
                                help="reconboost: initial (learned) rate of the ensemble.")),
    ("--head-init", dict(type=choice("head_init"), show_default=_default("head_init"),
                         help="Fusion head init: xavier (xavier-normal weights, zero bias, as the reference code) "
                              "or torch (PyTorch's Linear default).")),
    ("--on-nonfinite", dict(type=choice("on_nonfinite"), show_default=_default("on_nonfinite"),
                            help="A non-finite loss or gradient: stop with an error naming epoch and step, or "
                                 "skip the step.")),
    ("--amco-sigma", dict(type=float, show_default=_default("amco_sigma"),
                          help="amco: a modality whose mean softmax share exceeds this is masked next step.")),
    ("--amco-eps", dict(type=float, show_default=_default("amco_eps"),
                        help="amco: mask ratio sin(pi/2 min(eps, l)/eps); l grows by epoch/10 per step.")),
    ("--greedy-eps", dict(type=float, show_default=_default("greedy_eps"),
                          help="greedy: a re-balancing window starts when |d_BDR| exceeds this.")),
    ("--greedy-window", dict(type=int, show_default=_default("greedy_window"),
                             help="greedy: steps of a re-balancing window.")),
    ("--umt-teacher-audio", dict(type=click.Path(file_okay=False), show_default="none: umt needs one",
                                 help="umt: folder of a finished --modality audio run (its best.pt teaches).")),
    ("--umt-teacher-visual", dict(type=click.Path(file_okay=False), show_default="none: umt needs one",
                                  help="umt: folder of a finished --modality visual run (its best.pt teaches).")),
    ("--umt-scaling", dict(type=float, show_default=_default("umt_scaling"),
                           help="umt: weight of the teacher-feature MSE terms.")),
    ("--amss-temperature", dict(type=float, show_default=_default("amss_temperature"),
                                help="amss/amss-plus: temperature T of the keep shares softmax(-rate / T).")),
    ("--valuation-part-ratio", dict(type=float, show_default=_default("valuation_part_ratio"),
                                    help="valuation-modality: share of the training samples whose Shapley "
                                         "values give each modality's mean.")),
    ("--modality", dict(type=choice("modality"), show_default=_default("modality"),
                        help="both, or a unimodal baseline.")),
    ("--epochs", dict(type=int, show_default=_default("epochs"), help="Number of epochs (counted from 0).")),
    ("--batch-size", dict(type=int, show_default=_default("batch_size"),
                          help="Per process (global batch = this x processes).")),
    ("--eval-every", dict(type=int, show_default=_default("eval_every"),
                          help="Evaluate val and test every N epochs and after the last (selection sees those).")),
    ("--lr", dict(type=float, show_default=_default("lr"), help="Initial learning rate.")),
    ("--optimizer", dict(type=choice("optimizer"), show_default=_default("optimizer"), help="Optimizer.")),
    ("--weight-decay", dict(type=float, show_default=_default("weight_decay"), help="L2 weight decay.")),
    ("--lr-step", dict(type=int, show_default=_default("lr_step"), help="StepLR period in epochs.")),
    ("--lr-gamma", dict(type=float, show_default=_default("lr_gamma"), help="StepLR factor.")),
    ("--frames", dict(type=int, show_default="per dataset: 1 CREMA-D, 3 others",
                      help="Frames per clip fed to the visual encoder.")),
    ("--frame-pick", dict(type=choice("frame_pick"), show_default=_default("frame_pick"),
                          help="Which frames of a clip: segment (random per segment in training, segment middles in "
                               "evaluation), first (the first frames, as OGM-GE's CREMA-D/VGGSound loaders), fixed "
                               "(frames seg*i in training and evaluation, as its KS/AVE loader).")),
    ("--image-size", dict(type=int, show_default=_default("image_size"), help="Crop size of the frames in pixels.")),
    ("--arch", dict(type=choice("arch"), show_default=_default("arch"), help="Encoder architecture.")),
    ("--audio-arch", dict(type=choice("audio_arch"), show_default=_default("audio_arch"),
                          help="Audio encoder: same as --arch, or xvector (the x-vector TDNN, Table 4).")),
    ("--model", dict(type=choice("model"), show_default=_default("model"),
                     help="av (the encoders and a --fusion head), or another framework's model: tsn-av, tsm-av, "
                          "tbn, psp (Table 3), avga, psp (Table 5, with --task localisation).")),
    ("--task", dict(type=choice("task"), show_default=_default("task"),
                    help="classification (a label per clip) or localisation (a label per 1 s segment, AVE).")),
    ("--dropout", dict(type=float, show_default=_default("dropout"),
                       help="tsn-av, tsm-av, tbn: dropout before the classifier.")),
    ("--tbn-window", dict(type=int, show_default=_default("tbn_window"),
                          help="tbn: spectrogram frames of the audio window in each temporal binding window.")),
    ("--psp-threshold", dict(type=float, show_default=_default("psp_threshold"),
                             help="psp: pruning threshold of the audio-visual segment-pair similarities.")),
    ("--psp-avps-weight", dict(type=float, show_default=_default("psp_avps_weight"),
                               help="psp, localisation: weight of the audio-visual pair similarity loss.")),
    ("--encoder-weights", dict(type=click.Path(dir_okay=False), show_default="none: trained from scratch",
                               help="A state dict file (torch.save) to initialise the encoders from "
                                    "(audio_encoder.* / visual_encoder.* keys, or a run's checkpoint).")),
    ("--freeze-encoders/--no-freeze-encoders", dict(default=None, show_default=_default("freeze_encoders"),
                                                    help="Frameworks' models: keep the encoders fixed.")),
    ("--workers", dict(type=int, show_default=_default("workers"),
                       help="Data loader processes per training process.")),
    ("--device", dict(type=choice("device"), show_default=_default("device", "auto: CUDA when available"),
                      help="Training device.")),
    ("--amp", dict(type=choice("amp"), show_default=_default("amp"), help="bf16 autocast on the training device.")),
    ("--select-on", dict(type=choice("select_on"), show_default=_default("select_on", "selection is not a preset's"),
                         help="Split whose accuracy selects the best epoch: val, or test (the reference code's "
                              "protocol; every output made with it says 'best test epoch, as the reference code').")),
    ("--seed", dict(type=int, show_default=_default("seed"), help="Seed of weights, data order and noise.")),
    ("--s3-endpoint", dict(envvar="AWS_ENDPOINT_URL", show_default="$AWS_ENDPOINT_URL",
                           help="Endpoint URL of an S3-compatible store.")),
]


def train_options(exclude: tuple[str, ...] = (), overrides: dict[str, dict] | None = None):
    """Decorator adding every training setting as a click option (in help order); ``overrides``
    changes a flag's click arguments for one command (``required=True`` drops its shown default)."""
    def decorate(fn):
        for flag, kw in reversed(_TRAIN_OPTIONS):
            if flag in exclude:
                continue
            change = (overrides or {}).get(flag, {})
            if change.get("required"):
                kw = {k: v for k, v in kw.items() if k != "show_default"}
            fn = click.option(flag, **(kw | change))(fn)
        return fn
    return decorate


class TrainProgress:
    """Receiver of ``train``'s events: a progress display per epoch (a bar on a terminal, a
    plain line every 10 s in a log) and one line after each epoch."""

    def __enter__(self):
        self.progress = _ui.make_progress("steps", extra="stats").__enter__()
        self.task = self.eval_task = None
        self.method_tasks: dict[tuple[str, str], int] = {}
        self.t_run: float | None = None
        self.run_seconds: list[float] = []
        self.config: dict = {}
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def __call__(self, e: dict) -> None:
        kind = e["event"]
        if kind == "run_folder":
            if e["new"]:        # no --out: the run's own new folder, said first
                _ui.err_console.print(f"run folder: {e['out']}", soft_wrap=True, markup=False)
                _ui.add_typed_arguments("--out", e["out"])
        elif kind == "start":
            self.t_run = time.monotonic()
            self.config = e.get("config", {})
            _ui.err_console.print(f"training on {e['device']} x{e['world_size']}, epochs {e['start_epoch']}.."
                                  f"{e['epochs'] - 1}, {e['steps']} steps/epoch")
        elif kind == "epoch_start":
            for task in (self.task, self.eval_task):
                if task is not None:
                    self.progress.remove_task(task)
            self.eval_task = None
            self.task = self.progress.add_task(f"epoch {e['epoch']}", total=e["steps"], stats="")
        elif kind == "step":
            stats = f"loss {_fmt(e['loss'], 3)} acc {_fmt(e['acc'], 3)}"
            if self.bimodal:
                stats += f" rho_a {_fmt(e['rho_a'], 2)}"
            self.progress.update(self.task, completed=e["step"], stats=f"{stats} {e['samples_per_s']:.0f} samples/s")
        elif kind == "method_progress":     # a method's own work before an epoch (gradient-blending's estimate)
            key = (e["method"], e["task"])
            if key not in self.method_tasks:
                self.method_tasks[key] = self.progress.add_task(f"{e['method']}: {e['task']}", total=e["total"],
                                                                stats="")
            self.progress.update(self.method_tasks[key], completed=e["done"])
            if e["done"] >= e["total"]:
                self.progress.remove_task(self.method_tasks.pop(key))
        elif kind == "bad_sample":
            _ui.warn(f"skipped corrupt sample {e['key']} of {e['shard']}: {e['problem']}")
        elif kind == "warning":
            _ui.warn(e["message"])
        elif kind == "eval":
            self.progress.update(self.task, stats=f"evaluating {e['split']}")
            if self.eval_task is not None:
                self.progress.remove_task(self.eval_task)
            self.eval_task = self.progress.add_task(f"epoch {e['epoch']} {e['split']}", total=None, stats="")
        elif kind == "eval_step":
            self.progress.update(self.eval_task, completed=e["done"], total=e["total"])
        elif kind == "epoch_end":
            self.progress.console.print(epoch_line(e["record"], e["best"], self.config), soft_wrap=True)
        elif kind == "end" and self.t_run is not None:
            self.run_seconds.append(time.monotonic() - self.t_run)
            self.t_run = None

    def runs_eta(self, left: int) -> str:
        """``, ETA 0:12:00 for the 3 runs left`` from the mean wall time of the runs trained so
        far (sweep seeds, reproduce rows); empty before the first one ends."""
        if not self.run_seconds or left < 1:
            return ""
        return f", ETA {_ui._clock(sum(self.run_seconds) / len(self.run_seconds) * left)} for the {left} left"

    @property
    def bimodal(self) -> bool:
        return self.config.get("modality", "both") == "both"


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _fmt(x, digits: int = 4) -> str:
    """A NaN prints as ``nan`` (a diverged loss must be visible), a missing value as ``—``."""
    if x is None:
        return "—"
    return "nan" if isinstance(x, float) and math.isnan(x) else f"{x:.{digits}f}"


def epoch_line(r: dict, best: bool, config: dict) -> str:
    """``epoch 3 | loss ... | val acc ... | rho_a 1.28 k_a 0.23 k_v 1.00 | 25 samples/s *``.
    rho_a (audio over visual, as the plots show it) only for bimodal runs; k only for the methods
    that scale gradients."""
    parts = [f"epoch {r['epoch']}", f"loss {_fmt(r['train']['loss'])}", f"train acc {_fmt(r['train']['acc'])}"]
    for split in ("val", "test"):
        if r.get(split):
            parts.append(f"{split} acc {_fmt(r[split].get('acc'))} mAP {_fmt(r[split].get('map'))}")
    if config.get("modality", "both") == "both":
        balance = f"rho_a {_fmt(r['rho_a'])}"
        if config.get("modulation") in ("ogm", "ogm-ge"):
            balance += f" k_a {_fmt(r['k_a'])} k_v {_fmt(r['k_v'])}"
        parts.append(balance)
    parts.append(f"{r['samples_per_s']:.0f} samples/s")
    return " | ".join(parts) + (" [green]*[/]" if best else "")


_METRIC_KEYS = ["loss", "acc", "map", "acc_a", "map_a", "acc_v", "map_v"]


def metrics_table(title: str, rows: dict[str, dict]):
    """One row per split (or run) of evaluation metrics; a unimodal run's columns of the other
    modality (all missing) are left out."""
    keys = [k for k in _METRIC_KEYS if k in ("loss", "acc") or not all(_missing(m.get(k)) for m in rows.values())]
    return _ui.table(title, ["split", *keys],
                     ([s, *(_fmt(m.get(k)) for k in keys)] for s, m in rows.items()),
                     numeric=set(range(1, len(keys) + 1)))


def summary_table(title: str, rows: list[dict], at: str = "selected"):
    """The report's mean ± std rows as a rich table (``at``: the epoch they are from)."""
    head = ["run", *report_lib.column_titles(at)]
    body = ([r["label"], r["n"],
             *(report_lib.format_cell(k, r[k], r.get("selection")) for _t, k in report_lib.COLUMNS[1:])]
            for r in rows)
    return _ui.table(title, head, body, numeric=set(range(1, len(report_lib.COLUMNS) + 1)))


def absolute_shards(shards: str | None) -> str | None:
    """config.json records an absolute shard folder, so evaluate/probe work from any directory."""
    from ogmge_train.runfolder import absolute_location

    return absolute_location(shards) if shards else shards
