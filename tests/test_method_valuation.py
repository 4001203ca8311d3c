"""valuation-sample / valuation-modality (CVPR 2024): per-sample Shapley values, the re-sampling
plans and one training step against naive float64 references."""
import copy

import pytest
import torch
import torch.nn.functional as F

from ogmge_train import modulation
from ogmge_train.errors import ConfigError
from ogmge_train.models import build_model
from ogmge_train.modulation.base import StepRun, step_generator
from ogmge_train.modulation.valuation import sample_copies, shapley
from ogmge_train.plugin import Balancer
from tests._helpers import av_batch

B, C = 8, 3
NAMES = ("audio", "visual")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_shapley_values_of_every_correctness_pattern():
    """v(S) = |S| * correct: phi_a = (v_a + v_av - v_v) / 2 (hand-enumerated, NOTES table)."""
    table = {(0, 0, 0): (0, 0), (1, 0, 0): (.5, -.5), (0, 1, 0): (-.5, .5), (1, 1, 0): (0, 0),
             (0, 0, 1): (1, 1), (1, 0, 1): (1.5, .5), (0, 1, 1): (.5, 1.5), (1, 1, 1): (1, 1)}
    pats = list(table)
    col = [torch.tensor([p[i] for p in pats], dtype=torch.bool) for i in range(3)]
    phi = shapley({("audio",): col[0], ("visual",): col[1], ("audio", "visual"): col[2]}, NAMES)
    assert phi.tolist() == [list(table[p]) for p in pats]
    assert [sample_copies(p) for p in (-0.5, 0.0, 0.5, 1.0, 1.5)] == [3, 2, 1, 0, 0]


def _keyed(seed=0, batches=2):
    out = []
    for b in range(batches):
        audio, visual, labels = av_batch(B, C, seed + b)
        out.append(({"audio": audio, "visual": visual}, labels, [f"k{b}-{i}" for i in range(B)]))
    return out


def _reference_phi(model, batches):
    """Per sample: fused argmax with the other modality's pooled features zeroed (eval mode)."""
    model.eval()
    ref = {}
    with torch.no_grad():
        for inputs, labels, keys in batches:
            o = model(inputs["audio"], inputs["visual"])
            fa, fv = o.feat_a.double(), o.feat_v.double()
            head = copy.deepcopy(model.head).double()
            logits = {"a": head(fa, 0 * fv)[0], "v": head(0 * fa, fv)[0], "av": head(fa, fv)[0]}
            for i, k in enumerate(keys):
                y = int(labels[i])
                v = {s: float(int(lg[i].argmax()) == y) * len(s) for s, lg in logits.items()}
                ref[k] = ((v["a"] + v["av"] - v["v"]) / 2, (v["v"] + v["av"] - v["a"]) / 2)
    model.train()
    return ref


@pytest.mark.parametrize("fusion", ["concat", "sum", "film", "gated"])
def test_sample_plan_matches_reference(fusion):
    torch.manual_seed(0)
    model = build_model("small", fusion, C)
    side = model.modalities()
    method = modulation.build("valuation-sample")
    batches = _keyed()
    ref = _reference_phi(copy.deepcopy(model), batches)
    method.begin_epoch(modulation.EpochStart(side, 0, keyed_batches=lambda e: iter(batches)))
    assert model.training
    want = {k: [0] * sample_copies(pa) + [1] * sample_copies(pv) for k, (pa, pv) in ref.items()}
    assert method.copies == want
    n = len(ref)
    assert method.phi_mean == pytest.approx([sum(p[0] for p in ref.values()) / n, sum(p[1] for p in ref.values()) / n])


class _Start:
    """What ModalityValuation.plan reads of an EpochStart."""

    def __init__(self, side, seed=3, epoch=2, rank=0):
        self.modalities, self.seed, self.epoch, self.rank = side, seed, epoch, rank

    def reduce(self, t):
        return t


@pytest.mark.parametrize("phi_v", [0.2, 1.0])
def test_modality_plan_matches_reference(phi_v):
    torch.manual_seed(0)
    side = build_model("small", "concat", C).modalities()
    n = 50
    g = torch.Generator().manual_seed(1)
    phi = torch.tensor([[(-0.5, 0.0, 0.5, 1.0, 1.5)[int(i)], phi_v] for i in torch.randint(5, (n,), generator=g)],
                       dtype=torch.float64)
    keys = [f"s{i}" for i in range(n)]
    method = modulation.build("valuation-modality", valuation_part_ratio=0.4)
    copies = method.plan(keys, phi, _Start(side))
    replay = step_generator(3, 2, torch.device("cpu"), 0, 2)
    z = torch.randint(n, (int(0.4 * n),), generator=replay).tolist()
    mean_a = sum(phi[i, 0].item() for i in z) / len(z)
    mean_v = sum(phi[i, 1].item() for i in z) / len(z)
    gap_a, gap_v = 1 - mean_a, 1 - mean_v
    d = abs(gap_a - gap_v) * 2 / 3
    weak = 0 if gap_a > gap_v else 1
    want: dict = {}
    for i in torch.randint(n, (int(d * n),), generator=replay).tolist():
        want.setdefault(keys[i], []).append(weak)
    assert method.extra["valuation_d"] == pytest.approx(d, rel=1e-12)
    assert copies == want and sum(map(len, copies.values())) == int(d * n)


def test_modality_plan_tie_keeps_visual_and_balanced_means_copy_nothing():
    side = build_model("small", "concat", C).modalities()
    phi = torch.ones(10, 2, dtype=torch.float64)
    method = modulation.build("valuation-modality")
    assert method.plan([f"s{i}" for i in range(10)], phi, _Start(side)) == {}
    assert method.extra["valuation_d"] == 0.0


def _sgd(model, lr):
    return torch.optim.SGD(model.parameters(), lr=lr)


def test_step_matches_reference():
    """Rows and copies shuffled by the step's local generator, round(rows / batch) SGD steps of CE
    on the fused logits with each copy's other modality zeroed, against a float64 twin."""
    torch.manual_seed(0)
    model = build_model("small", "concat", C)
    twin = copy.deepcopy(model).double()
    side = model.modalities()
    method = modulation.build("valuation-sample")
    audio, visual, labels = av_batch(B, C, 5)
    keys = [f"k{i}" for i in range(B)]
    method.copies = {"k0": [0, 0, 1], "k3": [1], "k5": [0, 1], "k6": [1, 1, 1]}
    method._planned, method.phi_mean = 0, [0.1, 0.2]
    step = modulation.Step(side, labels, 0, inputs={"audio": audio, "visual": visual}, keys=keys, seed=4, step=9)
    result = method.train_step(step, StepRun(step, _sgd(model, 0.1)))

    rows = list(range(B)) + [0, 0, 0, 3, 5, 5, 6, 6, 6]
    keep = [(1.0, 1.0)] * B + [(1, 0), (1, 0), (0, 1), (0, 1), (1, 0), (0, 1), (0, 1), (0, 1), (0, 1)]
    order = torch.randperm(len(rows), generator=step_generator(4, 9, torch.device("cpu"), 0, 1)).tolist()
    parts = round(len(rows) / B)
    assert result.updates == parts == 2 and len(result.labels) == len(rows)
    for chunk in torch.tensor_split(torch.tensor(order), parts):
        idx = [rows[j] for j in chunk.tolist()]
        mask = torch.tensor([keep[j] for j in chunk.tolist()], dtype=torch.float64)
        out = twin(audio[idx].double(), visual[idx].double(),
                   feature_hook=lambda fa, fv, mask=mask: (fa * mask[:, :1], fv * mask[:, 1:]))
        loss = F.cross_entropy(out.logits, labels[idx])
        twin.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in twin.parameters():
                if p.grad is not None:
                    p -= 0.1 * p.grad
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.double(), q, rtol=1e-5, atol=1e-6, msg=name)
    assert result.stats["copies"] == 9 and result.stats["phi_a"] == 0.1


def test_inactive_epochs_train_plainly_and_keys_are_required():
    torch.manual_seed(0)
    model = build_model("small", "concat", C)
    bal = Balancer("valuation-sample", model.modalities(), start_epoch=1)
    batches = _keyed()
    bal.begin_epoch(0, keyed_batches=lambda e: iter(batches))
    assert bal.method.copies == {}
    inputs, labels, keys = batches[0]
    result = bal.train_step(inputs, labels, _sgd(model, 0.1), keys=keys)
    assert result.updates == 1 and len(result.labels) == B
    with pytest.raises(ConfigError, match="reads the samples' keys"):
        bal.train_step(inputs, labels, _sgd(model, 0.1))
    bal.begin_epoch(1, keyed_batches=lambda e: iter(batches))
    assert bal.method.copies                     # active from epoch 1: something to re-sample
    bal.epoch = 2                                # a step of an epoch that was not valued is refused
    with pytest.raises(RuntimeError, match="begin_epoch"):
        bal.train_step(inputs, labels, _sgd(model, 0.1), keys=keys)


def test_a_rank_with_fewer_rows_than_updates_steps_with_weight_zero():
    """Under DDP the update count comes from every rank's rows: a rank left with fewer rows than
    updates makes the missing ones with loss weight 0 (every rank takes the same number of steps)."""
    torch.manual_seed(0)
    model = build_model("small", "concat", C)
    side = model.modalities()
    method = modulation.build("valuation-sample")
    method._planned, method.phi_mean = 0, [0.0, 0.0]
    audio, visual, labels = av_batch(2, C, 1)

    def other_rank(t):                      # the other rank: 2 samples and 16 copies
        t += torch.tensor([18.0, 2.0], dtype=t.dtype)
        return t
    step = modulation.Step(side, labels, 0, all_reduce=other_rank, inputs={"audio": audio, "visual": visual},
                           keys=["x", "y"])
    result = method.train_step(step, StepRun(step, _sgd(model, 0.1)))
    assert result.updates == 5 and len(result.labels) == 2 and torch.isfinite(result.loss)
