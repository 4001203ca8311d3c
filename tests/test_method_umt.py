"""umt (ICML 2023): one training step against a naive float64 reference of
``CE(z) + lambda sum_u MSE(t_u(x_u), f_u)`` (frozen teachers, eval mode, outside the optimizer),
the inactive epochs, and the teachers taken from real uni-modal run folders: every fusion, refusals
with one-line errors, the teachers' path and sha256 in the state (not their weights), ``--resume``
bit-exact, a changed teacher refused, 2-rank DDP with parameters bitwise equal."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ogmge_train import names
from ogmge_train import train as train_mod
from ogmge_train.config import resolve
from ogmge_train.errors import ConfigError
from ogmge_train.models import build_model
from ogmge_train.modulation.umt import UMT, RunTeacher
from ogmge_train.plugin import Balancer
from tests._helpers import REPO, av_batch, read_jsonl, torchrun

B, C = 8, 5
LR = 0.1

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _teachers(seed=1):
    torch.manual_seed(seed)
    return {u: RunTeacher(build_model("small", "concat", C, modality=u), u) for u in ("audio", "visual")}


def _ce(z, y):
    return sum(-z[i, y[i]] + torch.logsumexp(z[i], 0) for i in range(len(y))) / len(y)


def _mse(a, b):
    return sum(float(x - y) ** 2 for x, y in zip(a.flatten().tolist(), b.flatten().tolist())) / a.numel()


@pytest.mark.parametrize("fusion", ["concat", "film"])
def test_step_matches_reference(fusion):
    torch.manual_seed(0)
    model = build_model("small", fusion, C)
    teachers = _teachers()
    before = {u: copy.deepcopy(t.state_dict()) for u, t in teachers.items()}
    plug = Balancer(UMT(teachers=teachers, umt_scaling=10.0), model.modalities())
    twin = copy.deepcopy(model).double()
    ref_teachers = {u: copy.deepcopy(t).double().eval() for u, t in teachers.items()}
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    plug.begin_epoch(0)
    audio, visual, labels = av_batch(B, C, 0)
    result = plug.train_step({"audio": audio, "visual": visual}, labels, opt)

    out = twin(audio.double(), visual.double())
    with torch.no_grad():
        t_a, t_v = ref_teachers["audio"](audio.double()), ref_teachers["visual"](visual.double())
    mse_a = ((out.feat_a - t_a) ** 2).sum() / t_a.numel()
    mse_v = ((out.feat_v - t_v) ** 2).sum() / t_v.numel()
    loss = _ce(out.logits, labels) + 10.0 * (mse_a + mse_v)
    loss.backward()
    assert result.loss.item() == pytest.approx(loss.item(), rel=1e-5)
    assert result.stats["umt_mse_a"] == pytest.approx(_mse(out.feat_a.detach(), t_a), rel=1e-5)
    assert result.stats["umt_mse_v"] == pytest.approx(_mse(out.feat_v.detach(), t_v), rel=1e-5)
    with torch.no_grad():
        for (n, p), q in zip(model.named_parameters(), twin.parameters()):
            want = q - LR * q.grad if q.grad is not None else q
            torch.testing.assert_close(p.double(), want, rtol=1e-4, atol=2e-6, msg=n)
    for u, t in teachers.items():               # frozen: eval mode (BatchNorm statistics unchanged), no gradient
        assert not t.training and all(not p.requires_grad and p.grad is None for p in t.parameters())
        assert all(torch.equal(v, before[u][k]) for k, v in t.state_dict().items())
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not ids & {id(p) for t in teachers.values() for p in t.parameters()}
    assert not any("teacher" in k for k in model.state_dict())


def test_outside_the_window_only_cross_entropy_and_refusals():
    torch.manual_seed(0)
    model = build_model("small", "sum", C)
    plug = Balancer(UMT(teachers=_teachers(), start_epoch=2, end_epoch=3), model.modalities())
    plug.begin_epoch(0)
    audio, visual, labels = av_batch(B, C, 1)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    out = plug.modalities.run({"audio": audio, "visual": visual})
    want = torch.nn.functional.cross_entropy(out.logits, labels)
    result = plug.train_step({"audio": audio, "visual": visual}, labels, opt)
    assert result.loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert result.stats["umt_mse_a"] == result.stats["umt_mse_v"] == 0.0
    with pytest.raises(ConfigError, match=r"^umt: needs a teacher for every modality: --umt-teacher-visual RUN"):
        Balancer("umt", build_model("small", "concat", C).modalities(), umt_teacher_audio="somewhere")
    with pytest.raises(ConfigError, match="--umt-scaling must be >= 0"):
        resolve("demo", shards="x", out="y", modulation="umt", umt_scaling=-1.0)
    assert resolve("bb-cremad", shards="x", out="y", modulation="umt").umt_scaling == 10.0
    assert "umt" in names.METHOD_HELP and "umt" not in names.METHOD_FUSIONS


# ------------------------------------------------------------------ real runs


def tiny(shards, out, **kw):
    kw = {"epochs": 2, "batch_size": 8, "image_size": 32, "workers": 0, "device": "cpu", "optimizer": "sgd",
          "lr": 0.05, **kw}
    return resolve("demo", shards=str(shards), out=str(out), **kw)


@pytest.fixture(scope="module")
def shards(train_shards):
    return train_shards()


@pytest.fixture(scope="module")
def teacher_runs(shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("umt-teachers")
    for u in ("audio", "visual"):
        train_mod.train(tiny(shards, root / u, modality=u, modulation="none", epochs=1))
    return root


def umt(shards, out, teachers, **kw):
    return tiny(shards, out, modulation="umt", umt_teacher_audio=str(teachers / "audio"),
                umt_teacher_visual=str(teachers / "visual"), **kw)


def ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("fusion", names.FUSIONS)
def test_trains_with_every_fusion_teachers_recorded_not_saved(shards, teacher_runs, tmp_path, fusion):
    run = tmp_path / "run"
    train_mod.train(umt(shards, run, teacher_runs, fusion=fusion))
    saved = ckpt(run / "last.pt")
    assert saved["method"]["teachers"] == {
        u: {"path": str((teacher_runs / u / "best.pt").resolve()), "sha256": sha(teacher_runs / u / "best.pt")}
        for u in ("audio", "visual")}
    student_keys = set(build_model("small", fusion, len(saved["classes"])).state_dict())
    assert set(saved["model"]) == student_keys           # no teacher weights in the checkpoint
    steps = read_jsonl(run / "steps.jsonl")
    assert all(s["umt_mse_a"] > 0 and s["umt_mse_v"] > 0 for s in steps)
    if fusion == "concat":                               # a finished run evaluates without its teachers
        moved = tmp_path / "moved"
        shutil.move(teacher_runs, moved)
        try:
            assert 0 <= train_mod.evaluate(run, "test", device="cpu", workers=0)["acc"] <= 1
        finally:
            shutil.move(moved, teacher_runs)


def test_teacher_runs_refused_with_one_line(shards, teacher_runs, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"^umt teacher for audio: .*nowhere/best\.pt: no such checkpoint \(give "
                                          r"the folder of a finished --modality audio run\)$"):
        train_mod.train(tiny(shards, tmp_path / "a", modulation="umt", umt_teacher_audio=str(tmp_path / "nowhere"),
                             umt_teacher_visual=str(teacher_runs / "visual")))
    with pytest.raises(ConfigError, match=r"^umt teacher for audio: .*visual/best\.pt: a --model av --modality "
                                          r"visual run, not a uni-modal --modality audio one$"):
        train_mod.train(tiny(shards, tmp_path / "b", modulation="umt", umt_teacher_audio=str(teacher_runs / "visual"),
                             umt_teacher_visual=str(teacher_runs / "visual")))
    # without --out: the numbered folder the run made is removed again, nothing else touched
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    events: list[dict] = []
    with pytest.raises(ConfigError, match=r"^umt teacher for audio: .*nowhere/best\.pt: no such checkpoint"):
        train_mod.train(resolve("demo", shards=str(shards), epochs=1, batch_size=8, image_size=32, workers=0,
                                device="cpu", modulation="umt", umt_teacher_audio=str(tmp_path / "nowhere"),
                                umt_teacher_visual=str(teacher_runs / "visual")), on_event=events.append)
    made = next(e["out"] for e in events if e["event"] == "run_folder")
    assert Path(made).parent == Path("runs") and not Path(made).exists() and list((cwd / "runs").iterdir()) == []
    assert any(e["event"] == "warning" and e["message"] == f"{made}: removed; the run stopped before its first step"
               for e in events)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "best.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"^umt teacher for visual: .*bad/best\.pt: not a loadable checkpoint"):
        train_mod.train(tiny(shards, tmp_path / "c", modulation="umt", umt_teacher_audio=str(teacher_runs / "audio"),
                             umt_teacher_visual=str(bad)))


class Crash(Exception):
    pass


def test_resume_is_bit_exact_and_a_changed_teacher_refused(shards, teacher_runs, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train_mod.train(umt(shards, full, teacher_runs, fusion="gated", epochs=3))

    def crash_in_epoch_2(e):
        if e["event"] == "step" and e["epoch"] == 2 and e["step"] == 2:
            raise Crash

    with pytest.raises(Crash):
        train_mod.train(umt(shards, part, teacher_runs, fusion="gated", epochs=3), on_event=crash_in_epoch_2)
    assert ckpt(part / "last.pt")["epoch"] == 1
    train_mod.train(umt(shards, part, teacher_runs, fusion="gated", epochs=3), resume=True)
    strip = [{k: v for k, v in r.items() if k not in ("time_s", "samples_per_s")}
             for r in read_jsonl(part / "metrics.jsonl")]
    assert strip == [{k: v for k, v in r.items() if k not in ("time_s", "samples_per_s")}
                     for r in read_jsonl(full / "metrics.jsonl")]
    assert (part / "steps.jsonl").read_bytes() == (full / "steps.jsonl").read_bytes()
    a, b = ckpt(part / "last.pt"), ckpt(full / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])

    changed = tmp_path / "changed"                       # the visual teacher retrained in place
    shutil.copytree(teacher_runs, changed)
    with pytest.raises(Crash):
        train_mod.train(umt(shards, tmp_path / "third", changed, epochs=3), on_event=crash_in_epoch_2)
    state = ckpt(changed / "visual" / "best.pt")
    state["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, changed / "visual" / "best.pt")
    with pytest.raises(ConfigError, match=r"^umt teacher for visual: .*changed/visual/best\.pt changed since this "
                                          r"run started \(sha256 [0-9a-f]{12}\.\.\. then, [0-9a-f]{12}\.\.\. now\)$"):
        train_mod.train(umt(shards, tmp_path / "third", changed, epochs=3), resume=True)


def test_ddp_keeps_parameters_identical(train_shards, teacher_runs, tmp_path):
    shards = train_shards(shard_size=3)
    out, hashes = tmp_path / "run", tmp_path / "hashes"
    hashes.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    settings = [f"umt_teacher_{u}={json.dumps(str(teacher_runs / u))}" for u in ("audio", "visual")]
    cmd = [*torchrun(), "--standalone", "--nproc-per-node", "2", str(REPO / "tests" / "ddp_worker.py"),
           str(shards), str(out), str(hashes), "umt", "concat", "epochs=3", *settings]
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rank0, rank1 = read_jsonl(hashes / "rank0.jsonl"), read_jsonl(hashes / "rank1.jsonl")
    assert rank0 == rank1 and len(rank0) == 3 and rank0[1]["sha256"] != rank0[2]["sha256"]
    assert all(s["umt_mse_a"] > 0 for s in read_jsonl(out / "steps.jsonl"))
