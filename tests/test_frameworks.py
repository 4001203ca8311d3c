"""The models of other frameworks (ogmge_train/frameworks/, the x-vector encoder): shapes and
gradients, each model's equations against a naive re-implementation, the unimodal-score rules,
encoder weights from a state dict, and (with shards) bit-exact resume of every model."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ogmge_train import frameworks
from ogmge_train import train as train_mod
from ogmge_train.config import TrainConfig, resolve
from ogmge_train.errors import ConfigError
from ogmge_train.frameworks._base import split_time
from ogmge_train.frameworks.avga import AudioGuidedAttention
from ogmge_train.frameworks.psp import PositiveSamplePropagation, avps_loss
from ogmge_train.frameworks.tsm import temporal_shift
from ogmge_train.localisation import rows, segment_accuracy
from ogmge_train.plugin import Balancer
from ogmge_train.xvector import XVector

pytestmark = pytest.mark.usefixtures("one_torch_thread")

C, B, BINS, T = 5, 4, 33, 40
MODELS = [("tsn-av", "classification"), ("tsm-av", "classification"), ("tbn", "classification"),
          ("psp", "classification"), ("psp", "localisation"), ("avga", "localisation")]


def make(model, task="classification", frames=3, **kw):
    cfg = TrainConfig(arch="small", model=model, task=task, frames=frames, tbn_window=8, audio_bins=BINS, **kw)
    return frameworks.build(cfg, C)


def inputs(frames=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 1, BINS, T, generator=g), torch.randn(B, frames, 3, 32, 32, generator=g)


@pytest.mark.parametrize("name,task", MODELS)
def test_shapes_and_every_parameter_gets_a_gradient(name, task):
    torch.manual_seed(0)
    frames = 4 if task == "localisation" else 3
    model = make(name, task, frames)
    audio, visual = inputs(frames)
    out = model(audio, visual)
    rows_ = B * frames if task == "localisation" else B
    k = C + 1 if task == "localisation" else C
    assert out.logits.shape == (rows_, k) and model.num_classes == k
    assert {u: v.shape for u, v in out.unimodal.items()} == {"audio": (rows_, k), "visual": (rows_, k)}
    assert {u: v.shape[1] for u, v in out.features.items()} == model.feature_dims()
    assert all(v.shape[0] == rows_ for v in out.features.values())
    labels = torch.randint(0, k, (rows_,))
    (F.cross_entropy(out.logits, labels) + out.loss_terms(labels)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert (out.model_loss is not None) == (name == "psp" and task == "localisation")
    # the model side: streams are disjoint, modulated weights are inside them, the encoders first
    m = model.modalities()
    ids = {u: {id(p) for p in m.params(u)} for u in m.names}
    assert not ids["audio"] & ids["visual"]
    assert all({id(p) for p in m.modulated(u)} <= ids[u] for u in m.names)
    assert {id(p) for p in model.audio_encoder.parameters()} <= ids["audio"]
    assert m.dims == model.feature_dims() and m.num_classes == k and m.head_params()


def test_tsn_consensus_and_exact_unimodal_scores():
    torch.manual_seed(0)
    model = make("tsn-av").eval()
    audio, visual = inputs()
    out = model(audio, visual)
    frame_scores = [model.fc_v(model.visual_encoder.trunk(visual[:, t]).mean(dim=(2, 3))) for t in range(3)]
    g_v = sum(frame_scores) / 3                                   # average consensus of the snippets
    g_a = model.fc_a(model.audio_encoder(audio))
    torch.testing.assert_close(out.unimodal["visual"], g_v)
    torch.testing.assert_close(out.unimodal["audio"], g_a)
    torch.testing.assert_close(out.logits, (g_a + g_v) / 2)
    assert not hasattr(model, "running")                          # exact: no running means kept


def test_temporal_shift_matches_its_definition():
    x = torch.randn(2 * 3, 16, 2, 2)
    y = temporal_shift(x, 3).view(2, 3, 16, 2, 2)
    xv = x.view(2, 3, 16, 2, 2)
    fold = 16 // 8
    for b in range(2):
        for t in range(3):
            for c in range(16):
                if c < fold:
                    want = xv[b, t + 1, c] if t + 1 < 3 else torch.zeros(2, 2)
                elif c < 2 * fold:
                    want = xv[b, t - 1, c] if t >= 1 else torch.zeros(2, 2)
                else:
                    want = xv[b, t, c]
                assert torch.equal(y[b, t, c], want)


@pytest.mark.parametrize("arch", ["small", "resnet18"])
def test_tsm_mixes_neighbouring_frames_and_tsn_does_not(arch):
    torch.manual_seed(0)
    for name, mixes in (("tsm-av", True), ("tsn-av", False)):
        cfg = TrainConfig(arch=arch, model=name, frames=3)
        enc = frameworks.build(cfg, C).visual_encoder.eval()
        visual = torch.randn(1, 3, 3, 32, 32, requires_grad=True)
        feats = enc.trunk(visual.flatten(0, 1)).mean(dim=(2, 3))   # (3 frames, D)
        feats[0].sum().backward()                                   # frame 0's features ...
        moved = visual.grad[0, 1].abs().sum() > 0                   # ... depend on frame 1?
        assert bool(moved) == mixes
    # the residual (identity) path is not shifted: ResNet-18's blocks wrap conv1 only
    tsm = frameworks.build(TrainConfig(arch="resnet18", model="tsm-av", frames=3), C)
    shifted = [n for n, m in tsm.visual_encoder.named_modules() if type(m).__name__ == "Shifted"]
    assert len(shifted) == 8 and all(n.endswith(".conv1") for n in shifted)


def test_tbn_windows_lie_in_their_segments_and_are_centred_in_evaluation():
    model = make("tbn")
    audio = torch.arange(T, dtype=torch.float32).expand(B, 1, BINS, T).contiguous()     # value = frame index
    model.eval()
    w = model.audio_windows(audio, 3).view(B, 3, 1, BINS, -1)
    seg = T // 3                                                   # 13 frames per segment, windows of 8
    assert w.shape[-1] == 8
    for t in range(3):
        start = t * seg + (seg - 8) // 2
        assert torch.equal(w[:, t, 0, 0], torch.arange(start, start + 8, dtype=torch.float32).expand(B, 8))
    model.train()
    torch.manual_seed(1)
    w = model.audio_windows(audio, 3).view(B, 3, 1, BINS, -1)
    for t in range(3):
        first = w[:, t, 0, 0, 0]
        assert ((first >= t * seg) & (first + 8 <= (t + 1) * seg)).all()
        assert torch.equal(w[:, t, 0, 0] - first[:, None], torch.arange(8.0).expand(B, 8))   # contiguous
    starts = {int(x) for x in w[:, :, 0, 0, 0].flatten()}
    assert len(starts) > 3                                         # offsets drawn per sample and window


def test_tbn_fusion_and_mean_substitution_by_hand():
    torch.manual_seed(0)
    model = make("tbn")
    audio, visual = inputs()
    model.train()
    model(audio, visual)                                           # one training batch: means = its mean
    model.eval()
    out = model(audio, visual)
    fa = out.features["audio"].view(B, 3, -1)
    fv = out.features["visual"].view(B, 3, -1)

    def head(a, v):
        return model.fc_out(torch.relu(model.fc1(torch.cat([a, v], dim=2)))).mean(dim=1)
    torch.testing.assert_close(out.logits, head(fa, fv))
    mean_a = model.running.mean("audio").view(1, 3, -1).expand_as(fa)
    mean_v = model.running.mean("visual").view(1, 3, -1).expand_as(fv)
    torch.testing.assert_close(out.unimodal["audio"], head(fa, mean_v))
    torch.testing.assert_close(out.unimodal["visual"], head(mean_a, fv))
    # the first training batch's features became the mean exactly (a plain average early on)
    model.train()
    first = model.encode(audio, visual)
    fresh = make("tbn")
    fresh.load_state_dict(model.state_dict())
    fresh.running.num_batches_tracked.zero_()
    fresh.train().running.update(first)
    torch.testing.assert_close(fresh.running.mean("audio"), first["audio"].mean(0))


@torch.no_grad()
def naive_psp(m: PositiveSamplePropagation, a, v):
    """PSP's equations written out segment by segment (float64)."""
    a, v = a.double(), v.double()
    W = {k: getattr(m, k).weight.double() for k in ("a1", "a2", "v1", "v2", "a_out", "v_out")}
    ln = m.norm
    out_f, out_a, out_v = [], [], []
    for b in range(a.shape[0]):
        A1, A2 = torch.relu(a[b] @ W["a1"].T), torch.relu(a[b] @ W["a2"].T)
        V1, V2 = torch.relu(v[b] @ W["v1"].T), torch.relu(v[b] @ W["v2"].T)
        S = a.shape[1]
        beta = torch.zeros(S, S, dtype=torch.float64)
        for i in range(S):
            for j in range(S):
                beta[i, j] = max(0.0, float(V2[i] @ A1[j]) / math.sqrt(m.hidden))

        def prune(x):
            x = x / (x.sum(1, keepdim=True) + 1e-8)
            x = torch.where(x > m.threshold, x, torch.zeros_like(x))
            return x / (x.sum(1, keepdim=True) + 1e-8)
        g_va, g_av = prune(beta), prune(beta.T.clone())
        vn = F.layer_norm(torch.relu((v[b] + g_va @ A2) @ W["v_out"].T), (a.shape[2],), ln.weight.double(),
                          ln.bias.double(), ln.eps)
        an = F.layer_norm(torch.relu((a[b] + g_av @ V1) @ W["a_out"].T), (a.shape[2],), ln.weight.double(),
                          ln.bias.double(), ln.eps)
        out_f.append((vn + an) / 2)
        out_a.append(an)
        out_v.append(vn)
    return torch.stack(out_f), torch.stack(out_a), torch.stack(out_v)


def test_psp_module_matches_its_equations_and_prunes():
    torch.manual_seed(0)
    m = PositiveSamplePropagation(dim=8, hidden=6, threshold=0.15).eval()
    a, v = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    for got, want in zip(m(a, v), naive_psp(m, a, v)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # a threshold above every normalised similarity propagates nothing: outputs depend on own segments only
    m.threshold = 1.0
    f, a_new, v_new = m(a, v)
    a2 = a.clone()
    a2[:, 1:] = torch.randn_like(a2[:, 1:])
    torch.testing.assert_close(m(a2, v)[1][:, 0], a_new[:, 0])


def test_avps_loss_by_hand():
    a, v = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    events = torch.tensor([[False, True, True, False], [False, False, False, False]])
    want = 0.0
    for b in range(2):
        sims = [max(0.0, float(F.cosine_similarity(a[b, t], v[b, t], dim=0))) for t in range(4)]
        total = sum(sims)
        n = int(events[b].sum())
        for t in range(4):
            target = (1 / n if events[b, t] else 0.0) if n else 0.0
            want += (sims[t] / (total + 1e-8) - target) ** 2
    assert float(avps_loss(a, v, events)) == pytest.approx(want / 8, rel=1e-5)


def test_audio_guided_attention_matches_its_equations():
    torch.manual_seed(0)
    att = AudioGuidedAttention(6, 5, hidden=7, width=4)
    a, maps = torch.randn(3, 6), torch.randn(3, 5, 2, 3)
    c, alpha = att(a, maps)
    for n in range(3):
        guide = att.w_a(torch.relu(att.u_a(a[n])))
        x = torch.stack([att.w(torch.tanh(att.w_v(torch.relu(att.u_v(maps[n, :, i // 3, i % 3]))) + guide))[0]
                         for i in range(6)])
        al = torch.softmax(x, 0)
        torch.testing.assert_close(alpha[n], al)
        torch.testing.assert_close(c[n], sum(al[i] * maps[n, :, i // 3, i % 3] for i in range(6)))


def test_psp_localisation_unimodal_is_mean_substitution_and_avps_uses_segment_labels():
    torch.manual_seed(0)
    model = make("psp", "localisation", 4)
    audio, visual = inputs(4)
    model.train()
    model(audio, visual)
    model.eval()
    out = model(audio, visual)
    subst = {"audio": out.features["audio"],
             "visual": model.running.mean("visual").expand_as(out.features["visual"])}
    torch.testing.assert_close(out.unimodal["audio"], model.fuse(subst)[0])
    assert out.model_loss is None                                  # evaluation: no training terms
    labels = torch.full((B * 4,), C)                               # background, but segments 1-2 of clip 0
    labels[1:3] = 2
    _, (a_new, v_new) = model.fuse(out.features)
    events = torch.zeros(B, 4, dtype=torch.bool)
    events[0, 1:3] = True
    torch.testing.assert_close(model.model_loss((a_new, v_new), labels), 100.0 * avps_loss(a_new, v_new, events))
    model.train()
    assert float(model(audio, visual).loss_terms(labels)) > 0


def test_xvector_layers_and_statistics_pooling():
    torch.manual_seed(0)
    xv = XVector(BINS, small=True).eval()
    assert xv.min_frames == 15 and xv.out_dim == 128
    convs = [m for m in xv.frames.modules() if isinstance(m, nn.Conv1d)]
    assert [(c.kernel_size[0], c.dilation[0]) for c in convs] == [(5, 1), (3, 2), (3, 3), (1, 1), (1, 1)]
    audio = torch.randn(2, 1, BINS, 30)
    h = xv.frames(audio.squeeze(1))
    assert h.shape == (2, 375, 30 - 14)                             # 4 + 4 + 6 frames of context
    stats = torch.cat([h.mean(2), h.std(2, unbiased=False)], 1)
    torch.testing.assert_close(xv(audio), xv.segment7(xv.segment6(stats)))
    torch.testing.assert_close(xv(audio.transpose(2, 3)), xv(audio))   # fbank layout (B, 1, T, mel)
    with pytest.raises(ValueError, match="at least 15 frames"):
        xv(torch.randn(2, 1, BINS, 10))
    assert not any(p.requires_grad for m in xv.modules() if isinstance(m, nn.BatchNorm1d) for p in m.parameters())


def test_xvector_as_the_audio_encoder_of_our_model():
    cfg = TrainConfig(arch="small", audio_arch="xvector", audio_bins=BINS)
    model = frameworks.build(cfg, C)
    assert isinstance(model.audio_encoder, XVector)
    conv = dict(model.modulated_parameters("audio"))
    weights = [n for n, p in model.audio_encoder.named_parameters() if n.endswith("weight")]
    assert sorted(conv) == sorted(f"audio_encoder.{n}" for n in weights) and len(conv) == 7   # 5 TDNN + 2 segment
    out = model.modalities().run({"audio": torch.randn(B, 1, BINS, T), "visual": torch.randn(B, 1, 3, 32, 32)})
    assert out.logits.shape == (B, C)
    with pytest.raises(ConfigError, match="audio_bins"):
        frameworks.build(TrainConfig(arch="small", audio_arch="xvector"), C)


def test_config_filled_bins_and_refused_combinations():
    cfg = TrainConfig().with_dataset("cremad", (257, 299), "stft")
    assert cfg.audio_bins == 257
    assert TrainConfig().with_dataset("cremad", (1024, 128), "fbank").audio_bins == 128
    with pytest.raises(ConfigError, match="localisation"):
        TrainConfig(model="avga")
    with pytest.raises(ConfigError, match="classification"):
        TrainConfig(model="tbn", task="localisation")
    with pytest.raises(ConfigError, match="--model av"):
        TrainConfig(model="tbn", modality="audio")


def test_encoder_weights_from_a_state_dict(tmp_path):
    torch.manual_seed(0)
    donor = make("avga", "localisation", 4)
    torch.save({k: v for k, v in donor.state_dict().items() if k.startswith(("audio_encoder.", "visual_encoder."))},
               tmp_path / "enc.pt")
    torch.manual_seed(1)
    model = make("avga", "localisation", 4, encoder_weights=str(tmp_path / "enc.pt"), freeze_encoders=True)
    for name in ("audio_encoder", "visual_encoder"):
        for (k, a), b in zip(getattr(model, name).state_dict().items(), getattr(donor, name).state_dict().values()):
            assert torch.equal(a, b), k
    assert not any(p.requires_grad for p in model.audio_encoder.parameters())
    model.train()
    assert model.training and not model.audio_encoder.training and model.lstm_a.training
    m = model.modalities()
    assert all(p.requires_grad for u in m.names for p in m.modulated(u))     # the LSTMs, not the frozen encoders
    # a run checkpoint works too ({"model": ...}); a wrong one is one clear line
    torch.save({"model": donor.state_dict()}, tmp_path / "ckpt.pt")
    frameworks.load_encoder_weights(make("avga", "localisation", 4), tmp_path / "ckpt.pt")
    with pytest.raises(ConfigError, match="no such"):
        make("tbn", encoder_weights=str(tmp_path / "missing.pt"))
    with pytest.raises(ConfigError, match="does not fit"):
        frameworks.load_encoder_weights(frameworks.build(TrainConfig(arch="resnet18", model="tbn", frames=3), C),
                                        tmp_path / "enc.pt")
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="no audio_encoder"):
        make("tbn", encoder_weights=str(tmp_path / "other.pt"))


def test_ogm_ge_modulates_the_stream_weights_of_a_framework():
    """OGM-GE through the plug-in API scales the dominant stream's weight gradients by k (AVGA:
    its encoder convs and its LSTM weights) and leaves the head alone."""
    torch.manual_seed(0)
    model = make("avga", "localisation", 4)
    bal = Balancer("ogm", model.modalities(), alpha=0.5)
    audio, visual = inputs(4)
    out = model(audio, visual)
    labels = torch.randint(0, C + 1, (B * 4,))
    F.cross_entropy(out.logits, labels).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    stats = bal.after_backward(out, labels)
    scaled = {n for n, _ in model.modulated_parameters("audio")} | {n for n, _ in model.modulated_parameters("visual")}
    assert any(n.startswith("lstm_a.weight") for n in scaled) and any(n.startswith("lstm_v.weight") for n in scaled)
    for n, p in model.named_parameters():
        u = "audio" if n in dict(model.modulated_parameters("audio")) else "visual"
        k = stats[f"k_{u[0]}"] if n in scaled else 1.0
        torch.testing.assert_close(p.grad, before[n] * k)
    assert min(stats["k_a"], stats["k_v"]) < 1.0


def test_segment_rows_and_the_ave_accuracy():
    model = make("avga", "localisation", 4)
    seg = torch.tensor([[-1, 2, 2, -1], [0, 0, -1, -1]])
    labels, keys = rows(model, {"segments": seg}, torch.tensor([2, 0]), ["a", "b"])
    assert labels.tolist() == [C, 2, 2, C, 0, 0, C, C] and keys == ["a"] * 4 + ["b"] * 4
    with pytest.raises(ConfigError, match="--frames 4"):
        rows(model, {"segments": seg[:, :3]}, torch.tensor([2, 0]), ["a", "b"])
    assert rows(make("tbn"), {}, torch.tensor([1]), ["a"])[0].tolist() == [1]
    # the AVE code's compute_acc: arg-max of one-hot labels and scores per segment, then the mean
    logits = torch.randn(3, 10, C + 1)
    truth = torch.randint(0, C + 1, (3, 10))
    onehot = F.one_hot(truth, C + 1)
    right = sum(int(torch.argmax(logits[i, j]) == torch.argmax(onehot[i, j])) for i in range(3) for j in range(10))
    assert segment_accuracy(logits, truth) == pytest.approx(right / 30)
    assert segment_accuracy(logits.flatten(0, 1), truth.flatten()) == pytest.approx(right / 30)


def test_split_time_cuts_equal_chunks():
    audio = torch.arange(23.0).expand(1, 1, 2, 23)
    chunks = split_time(audio, 4)
    assert chunks.shape == (1, 4, 1, 2, 5) and chunks[0, 3, 0, 0].tolist() == [15, 16, 17, 18, 19]
    with pytest.raises(ValueError, match="cannot be cut"):
        split_time(audio, 24)


# ---------------------------------------------------------------- training on shards

@pytest.fixture(scope="module")
def shards(train_shards):
    return train_shards()


def tiny(shards, out, **kw):
    kw = {"epochs": 3, "batch_size": 8, "image_size": 32, "workers": 0, "device": "cpu", "frames": 3,
          "tbn_window": 8, "optimizer": "sgd", "lr": 0.05, **kw}
    return resolve("demo", shards=str(shards), out=str(out), **kw)


class Crash(Exception):
    pass


@pytest.mark.parametrize("settings", [{"model": "tsn-av"}, {"model": "tsm-av"}, {"model": "tbn"}, {"model": "psp"},
                                      {"model": "av", "audio_arch": "xvector"}], ids=lambda s: "-".join(s.values()))
def test_resume_is_bit_exact(shards, tmp_path, settings):
    full, part = tmp_path / "full", tmp_path / "part"
    train_mod.train(tiny(shards, full, **settings))

    def crash(e):
        if e["event"] == "step" and e["epoch"] == 2 and e["step"] == 2:
            raise Crash
    with pytest.raises(Crash):
        train_mod.train(tiny(shards, part, **settings), on_event=crash)
    train_mod.train(tiny(shards, part, **settings), resume=True)
    assert (part / "steps.jsonl").read_bytes() == (full / "steps.jsonl").read_bytes()
    a = torch.load(part / "last.pt", weights_only=True)["model"]
    b = torch.load(full / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    steps = [json.loads(line) for line in (full / "steps.jsonl").read_text().splitlines()]
    assert any(min(s["k_a"], s["k_v"]) < 1.0 for s in steps)       # OGM-GE was active
    cfg = json.loads((full / "config.json").read_text())
    assert cfg["model"] == settings["model"] and cfg["audio_bins"] == 129
