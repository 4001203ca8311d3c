"""relearning (Diagnosing & Re-learning, ECCV 2024): k-means, purity and the soft re-initialisation
against naive float64 references and scikit-learn."""
import copy
import math

import pytest
import torch

from ogmge_train import modulation
from ogmge_train.models import build_model
from ogmge_train.modulation import relearning as rl
from ogmge_train.modulation.gradient_blending import held_out

B, C = 8, 5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _keyed(n_batches=6, seed=0):
    out = []
    for s in range(n_batches):
        g = torch.Generator().manual_seed(seed + s)
        out.append((torch.randn(B, 1, 32, 48, generator=g), torch.randn(B, 1, 3, 32, 32, generator=g),
                    torch.randint(0, C, (B,), generator=g), [f"clip-{seed}-{s}-{i}" for i in range(B)]))
    return out


def _inputs(data):
    return iter([({"audio": a, "visual": v}, y, keys) for a, v, y, keys in data])


def _naive_purity(labels, clusters):
    agree = 0
    for c in set(clusters):
        members = [y for y, k in zip(labels, clusters) if k == c]
        agree += max(members.count(y) for y in set(members))
    return agree / len(labels)


def _naive_minmax(x):
    cols = list(zip(*x))
    out = []
    for row in x:
        new = []
        for j, v in enumerate(row):
            lo, hi = min(cols[j]), max(cols[j])
            new.append((v - lo) / (hi - lo) * 2 - 1 if hi > lo else -1.0)
        out.append(new)
    return out


def test_minmax_and_purity_match_naive_loops():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    x[:, 3] = 2.5                                            # a constant column
    torch.testing.assert_close(rl.minmax_scale(x), torch.tensor(_naive_minmax(x.tolist()), dtype=torch.float64),
                               rtol=0, atol=1e-12)
    labels = torch.randint(0, 4, (40,), generator=g)
    clusters = torch.randint(0, 5, (40,), generator=g)
    assert rl.purity(labels, clusters) == _naive_purity(labels.tolist(), clusters.tolist())
    assert rl.purity(labels, labels) == 1.0


def test_lloyd_matches_scikit_learn_from_the_same_start():
    """Our Lloyd iterations equal scikit-learn's KMeans (the official code's) started from the
    same k-means++ centres: the same clusters, so the same purity."""
    cluster = pytest.importorskip("sklearn.cluster")
    g = torch.Generator().manual_seed(1)
    for k, n, d in ((5, 300, 16), (6, 120, 64), (31, 400, 8)):
        centres = torch.randn(k, d, generator=g, dtype=torch.float64) * 3
        x = rl.minmax_scale(centres[torch.randint(0, k, (n,), generator=g)]
                            + torch.randn(n, d, generator=g, dtype=torch.float64))
        init = rl.kmeans_plus_plus(x, k, torch.Generator().manual_seed(0))
        ours = rl.lloyd(x, init.clone())
        ref = cluster.KMeans(n_clusters=k, init=init.numpy(), n_init=1).fit(x.numpy())
        assert ours.tolist() == ref.labels_.tolist()


def test_kmeans_plus_plus_picks_distinct_points_far_apart():
    x = torch.cat([torch.zeros(50, 2), torch.full((50, 2), 10.0), torch.tensor([[0.0, 10.0]] * 50)]).double()
    for seed in range(5):
        init = rl.kmeans_plus_plus(x, 3, torch.Generator().manual_seed(seed))
        assert sorted(map(tuple, init.tolist())) == [(0.0, 0.0), (0.0, 10.0), (10.0, 10.0)]


def test_schedule_matches_the_official_epochs():
    """Official: after epochs R, 2R, ..., N*R (0-based); here before the next epoch."""
    m = modulation.build("relearning", alpha=0.0, start_epoch=0, end_epoch=50)        # R=20, N=3
    assert [e for e in range(100) if m.due(e)] == [21, 41, 61]
    assert [m.due(e) for e in (21, 41, 61)] == [1, 2, 3]
    m = modulation.build("relearning", alpha=0.0, start_epoch=5, end_epoch=6, relearn_every=15, relearn_times=2)
    assert [e for e in range(100) if m.due(e)] == [21, 36]


def test_held_out_part_is_never_trained_on():
    m = modulation.build("relearning", alpha=0.0, start_epoch=0, end_epoch=None, relearn_holdout=0.3)
    keys = [f"k{i}" for i in range(2000)]
    rows = m.train_rows(keys)
    assert rows.tolist() == [not held_out(k, 0.3) for k in keys]
    assert (~rows).float().mean().item() == pytest.approx(0.3, abs=0.04)


@pytest.mark.parametrize("fusion", ["concat", "gated"])
def test_reinitialisation_matches_reference(fusion):
    """theta0 captured before training; before the due epoch: features of train and held-out
    (eval mode), min-max scaled, k-means (scikit-learn from the same seeding), purity gap, w =
    tanh(lambda gap), every encoder parameter <- w theta0 + (1 - w) theta."""
    cluster = pytest.importorskip("sklearn.cluster")
    torch.manual_seed(0)
    model = build_model("small", fusion, C)
    data = _keyed()
    method = modulation.build("relearning", alpha=0.0, start_epoch=0, end_epoch=None, relearn_lambda=2.0,
                              relearn_every=1, relearn_times=1, relearn_holdout=0.4)

    side = model.modalities()
    method.setup(side)

    def start(epoch):
        return modulation.EpochStart(side, epoch, len(data), None, keyed_batches=lambda e: _inputs(data))
    theta0 = copy.deepcopy(model.state_dict())
    method.begin_epoch(start(0))
    with torch.no_grad():                          # "training": move every parameter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    method.begin_epoch(start(1))                   # not due
    trained = copy.deepcopy(model)
    method.begin_epoch(start(2))                   # due: the diagnosis and the re-initialisation

    # reference: features in eval mode, per part, min-max scaled by loops, k-means from the same seeding
    trained.eval()
    with torch.no_grad():
        outs = [(trained(a, v), y, keys) for a, v, y, keys in data]
    weights = []
    for which in ("feat_a", "feat_v"):
        purities = []
        for part in (False, True):
            rows = [(getattr(o, which)[i].double().tolist(), int(y[i])) for o, y, keys in outs
                    for i, k in enumerate(keys) if held_out(k, 0.4) == part]
            x = torch.tensor(_naive_minmax([r[0] for r in rows]), dtype=torch.float64)
            init = rl.kmeans_plus_plus(x, C, torch.Generator().manual_seed(0))
            clusters = cluster.KMeans(n_clusters=C, init=init.numpy(), n_init=1).fit(x.numpy()).labels_
            purities.append(_naive_purity([r[1] for r in rows], clusters.tolist()))
        weights.append(math.tanh(2.0 * abs(purities[0] - purities[1])))
    assert method.weights == pytest.approx(weights, abs=1e-12)
    assert max(weights) > 0
    for name, p in model.named_parameters():
        before = dict(trained.named_parameters())[name]
        if name.startswith(("audio_encoder.", "visual_encoder.")):
            w = weights[0] if name.startswith("audio") else weights[1]
            torch.testing.assert_close(p, w * theta0[name] + (1 - w) * before, rtol=1e-6, atol=1e-7, msg=name)
        else:                                      # the head is not re-initialised
            assert torch.equal(p, before), name
    assert method.init is None and method.state_dict().keys() == {"weights"}   # theta0 no longer needed


def test_state_keeps_theta0_until_the_last_reinitialisation():
    torch.manual_seed(0)
    model = build_model("small", "concat", C)
    data = _keyed(2)
    method = modulation.build("relearning", alpha=0.0, start_epoch=0, end_epoch=None)
    side = model.modalities()
    method.setup(side)
    method.begin_epoch(modulation.EpochStart(side, 0, 2, None, keyed_batches=lambda e: _inputs(data)))
    state = method.state_dict()
    twin = modulation.build("relearning", alpha=0.0, start_epoch=0, end_epoch=None)
    twin.setup(side)
    twin.load_state_dict(state)
    params = {u: side.params(u) for u in side.names}
    assert state["init"].keys() == {f"{u}.{i}" for u, ps in params.items() for i in range(len(ps))}
    assert all(torch.equal(state["init"][f"{u}.{i}"], p) for u, ps in params.items() for i, p in enumerate(ps))
    assert all(torch.equal(twin.init[n], t) for n, t in method.init.items())
