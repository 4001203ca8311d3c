"""ume (ICML 2023): one run equals two separately trained uni-modal models (same batches, same
optimizer), and the evaluation ensemble is the mean of their logits (float64 reference)."""

import pytest
import torch

from ogmge_train.config import resolve
from ogmge_train.errors import ConfigError
from ogmge_train.models import build_model
from ogmge_train.plugin import Balancer
from tests._helpers import av_batch

B, C = 8, 5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(seed=0):
    return av_batch(B, C, seed)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_one_run_equals_separate_unimodal_runs(optimizer):
    def make(params):
        if optimizer == "sgd":
            return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)

    torch.manual_seed(0)
    model = build_model("small", "concat", C)
    plug = Balancer("ume", model.modalities())
    solo = {}
    for u in ("audio", "visual"):                  # a uni-modal model of each modality, same weights
        solo[u] = build_model("small", "concat", C, modality=u)
        getattr(solo[u], f"{u}_encoder").load_state_dict(getattr(model, f"{u}_encoder").state_dict())
        solo[u].head.load_state_dict(model.aux_heads[u].state_dict())
    opt = make(model.parameters())
    opts = {u: make(m.parameters()) for u, m in solo.items()}
    for s in range(3):
        audio, visual, labels = _batch(s)
        plug.train_step({"audio": audio, "visual": visual}, labels, opt)
        for u, m in solo.items():
            opts[u].zero_grad()
            out = m(audio if u == "audio" else None, visual if u == "visual" else None)
            torch.nn.functional.cross_entropy(out.logits, labels).backward()
            opts[u].step()
    for u, m in solo.items():
        for (n, p), q in zip(getattr(model, f"{u}_encoder").named_parameters(),
                             getattr(m, f"{u}_encoder").parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=n)
        for p, q in zip(model.aux_heads[u].parameters(), m.head.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)

    model.eval()
    audio, visual, _ = _batch(9)
    with torch.no_grad():
        ev = plug.evaluate(plug.modalities.run({"audio": audio, "visual": visual}))
        za = solo["audio"].eval()(audio, None).logits.double()
        zv = solo["visual"].eval()(None, visual).logits.double()
    torch.testing.assert_close(ev.logits.double(), (za + zv) / 2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ev.unimodal["visual"].double(), zv, rtol=1e-5, atol=1e-6)


def test_every_epoch_and_refusals():
    torch.manual_seed(0)
    model = build_model("small", "concat", C)
    plug = Balancer("ume", model.modalities(), start_epoch=5, end_epoch=6)
    audio, visual, labels = _batch()
    out = plug.modalities.run({"audio": audio, "visual": visual})
    heads = model.aux_heads
    want = sum(torch.nn.functional.cross_entropy(heads[u](out.features[u]), labels) for u in ("audio", "visual"))
    assert plug.loss(out, labels).item() == pytest.approx(want.item(), rel=1e-6)     # epoch 0: outside the window
    with pytest.raises(ConfigError, match="--modulation ume works with --fusion concat, not 'film'"):
        resolve("demo", shards="x", out="y", modulation="ume", fusion="film")
