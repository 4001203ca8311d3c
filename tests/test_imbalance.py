"""The Shapley modality contribution (BalanceBenchmark's imbalance measure) against a naive
reference: every coalition evaluated sample by sample with zeroed inputs, Shapley weights from
factorials over all subsets, as the benchmark's Calculate_Shapley."""
from itertools import combinations
from math import factorial

import pytest
import torch

from ogmge_train import imbalance
from ogmge_train.models import build_model
from ogmge_train.plugin import Balancer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _naive_shapley(model, audio, visual, labels):
    mods = ("a", "v")

    def value(coalition):
        right = 0
        with torch.no_grad():
            for i in range(len(labels)):
                a = audio[i:i + 1] if "a" in coalition else torch.zeros_like(audio[i:i + 1])
                v = visual[i:i + 1] if "v" in coalition else torch.zeros_like(visual[i:i + 1])
                right += int(model(a, v).logits.argmax(1).item() == labels[i].item())
        return right / len(labels)

    n, phi = len(mods), {}
    for m in mods:
        others = [x for x in mods if x != m]
        phi[m] = sum(factorial(len(s)) * factorial(n - len(s) - 1) / factorial(n) * (value((*s, m)) - value(s))
                     for r in range(len(others) + 1) for s in combinations(others, r))
    return phi


@pytest.mark.parametrize("fusion", ["concat", "gated"])
def test_shapley_matches_the_benchmarks_definition(fusion):
    torch.manual_seed(0)
    model = build_model("small", fusion, 3).eval()
    with torch.no_grad():                       # a head that leans on audio: unequal contributions
        for p in model.head.parameters():
            if p.dim() == 2 and p.shape[1] == 256:
                p[:, :128] *= 4
    g = torch.Generator().manual_seed(1)
    audio, visual = torch.randn(24, 1, 32, 48, generator=g), torch.randn(24, 1, 3, 32, 32, generator=g)
    plug = Balancer("none", model.modalities())
    with torch.no_grad():
        labels = model(audio, visual).logits.argmax(1)
        labels[::3] = (labels[::3] + 1) % 3     # not all right: v({a, v}) = 2/3
        pred = {"logits": model(audio, visual).logits, "labels": labels,
                **imbalance.coalition_logits(plug, {"audio": audio, "visual": visual})}
    assert set(pred) - {"logits", "labels"} == {"coalition:", "coalition:audio", "coalition:visual"}
    got = imbalance.shapley(pred, ("audio", "visual"), {"audio": "a", "visual": "v"})
    want = _naive_shapley(model, audio, visual, labels)
    assert (got["shapley_a"], got["shapley_v"]) == pytest.approx((want["a"], want["v"]), abs=1e-12)
    empty = (pred["coalition:"].argmax(1) == labels).double().mean().item()
    assert got["shapley_a"] + got["shapley_v"] == pytest.approx(2 / 3 - empty, abs=1e-12)   # efficiency


def test_three_modalities_follow_the_factorial_weights():
    """The general formula (every subset, |S|!(M-|S|-1)!/M!) on given coalition accuracies."""
    g = torch.Generator().manual_seed(2)
    names, labels = ("x", "y", "z"), torch.randint(0, 4, (50,), generator=g)
    pred = {"labels": labels, "logits": torch.randn(50, 4, generator=g)}
    for kept in imbalance.coalitions(names):
        pred[imbalance.key(kept)] = torch.randn(50, 4, generator=g)
    assert len(pred) == 2 + 7

    def value(s):
        logits = pred["logits"] if len(s) == 3 else pred[imbalance.key(tuple(n for n in names if n in s))]
        return sum(int(logits[i].argmax()) == int(labels[i]) for i in range(50)) / 50

    got = imbalance.shapley(pred, names, {n: n for n in names})
    for m in names:
        others = [x for x in names if x != m]
        want = sum(factorial(len(s)) * factorial(2 - len(s)) / 6 * (value({*s, m}) - value(set(s)))
                   for r in range(3) for s in combinations(others, r))
        assert got[f"shapley_{m}"] == pytest.approx(want, abs=1e-12)
    assert sum(got.values()) == pytest.approx(value(set(names)) - value(set()), abs=1e-12)


def test_unimodal_models_have_no_coalitions():
    model = build_model("small", "concat", 3, modality="audio").eval()
    assert imbalance.coalition_logits(Balancer("none", model.modalities()), {"audio": torch.zeros(2, 1, 32, 48)}) == {}
    assert imbalance.shapley({"logits": torch.zeros(2, 3), "labels": torch.zeros(2, dtype=torch.long)},
                             ("audio",), {"audio": "a"}) == {}


def test_training_records_shapley_per_epoch_and_the_report_shows_it(train_shards, tmp_path):
    from ogmge_train import report
    from ogmge_train import train as train_mod
    from ogmge_train.config import resolve
    from tests._helpers import read_jsonl

    out = tmp_path / "run"
    train_mod.train(resolve("demo", shards=str(train_shards()), out=str(out), epochs=2, batch_size=8, image_size=32,
                            workers=0, device="cpu", modulation="none"))
    records = read_jsonl(out / "metrics.jsonl")
    for r in records:
        for split in ("val", "test"):
            assert -1 <= r[split]["shapley_a"] <= 1 and -1 <= r[split]["shapley_v"] <= 1
    # evaluating the saved model again gives the same numbers (the coalitions are deterministic)
    again = train_mod.evaluate(out, split="test", which="last", device="cpu", workers=0)
    assert (again["shapley_a"], again["shapley_v"]) == pytest.approx(
        (records[-1]["test"]["shapley_a"], records[-1]["test"]["shapley_v"]), abs=1e-12)
    rep = report.write_report([out], tmp_path / "report")
    md = rep.markdown.read_text()
    test = records[rep.groups[0].runs[0].summary["selected_epoch"]]["test"]
    assert "| selected epoch | audio Shapley | visual Shapley |" in md
    assert f"| {100 * test['shapley_a']:.1f} | {100 * test['shapley_v']:.1f} |" in md
    assert rep.plots["shapley"].read_bytes()[:4] == b"\x89PNG"
