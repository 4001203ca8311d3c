"""Reports over run folders (fabricated, fast), sweeps' mean ± std, and the linear probe."""
from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ogmge_train import report
from ogmge_train.errors import RunFolderError


def _write_run(path, *, seed, modulation="ogm-ge", test_acc=0.5, epochs=3, probe_v=None,
               summary=True, steps_per_epoch=4):
    """A run folder as ARCHITECTURE.md describes it, with chosen numbers."""
    path.mkdir(parents=True)
    cfg = {"seed": seed, "out": str(path), "modulation": modulation, "fusion": "concat", "lr": 1e-3}
    (path / "config.json").write_text(json.dumps(cfg))
    metrics, steps = [], []
    for e in range(epochs):
        def split(acc, e=e):
            return {"loss": 2.0 - 0.1 * e, "acc": acc, "map": acc / 2, "acc_a": acc + 0.1,
                    "map_a": 0.3, "acc_v": acc - 0.1, "map_v": 0.2}
        # val peaks at epoch 1: selection must pick it, not the last epoch
        val_acc = 0.6 if e == 1 else 0.4
        metrics.append({"epoch": e, "lr": 1e-3, "train": {"loss": 1.5 - 0.2 * e, "acc": 0.5,
                                                          "acc_a": 0.6, "acc_v": 0.3},
                        "val": split(val_acc), "test": split(test_acc if e == 1 else 0.1),
                        "rho_a": 2.0, "rho_v": 0.5, "k_a": 0.3, "k_v": 1.0,
                        "samples_per_s": 100.0, "time_s": 1.0})
        for s in range(steps_per_epoch):
            steps.append({"epoch": e, "step": e * steps_per_epoch + s, "loss": 1.0,
                          "rho_a": 3.0 - 0.1 * s, "rho_v": 1 / (3.0 - 0.1 * s), "k_a": 0.2, "k_v": 1.0})
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (path / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    if summary:
        (path / "summary.json").write_text(json.dumps(
            {"selected_epoch": 1, "val": metrics[1]["val"], "test": metrics[1]["test"]}))
    if probe_v is not None:
        (path / "probe_visual.json").write_text(json.dumps({"modality": "visual", "test": {"acc": probe_v}}))
    return path


def _parse_table(md: str) -> tuple[list[str], list[list[str]]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    assert set(lines[1]) <= set("|-"), "second table line must be the separator"
    return cells[0], cells[2:]


def test_report_writes_pngs_and_a_table_with_one_row_per_run(tmp_path):
    a = _write_run(tmp_path / "runs" / "base", seed=0, modulation="none", test_acc=0.5)
    b = _write_run(tmp_path / "runs" / "ogm", seed=0, test_acc=0.7, probe_v=0.45)
    rep = report.write_report([a, b], tmp_path / "out")

    head, rows = _parse_table(rep.markdown.read_text())
    assert head == ["run", "seeds", "fused acc", "fused mAP", "audio acc", "visual acc",
                    "audio probe acc", "visual probe acc", "selected epoch", "audio Shapley", "visual Shapley"]
    assert [r[0] for r in rows] == ["base", "ogm"]
    # the selected epoch's test numbers (epoch 1), not the last epoch's
    # one seed: no "± 0.0", the spread was not measured
    assert rows[0][2:7] == ["50.0", "25.0", "60.0", "40.0", "—"]
    assert rows[1][7] == "45.0" and rows[0][7] == "—"
    assert rows[1][8] == "1"
    for name in ("accuracy", "rho", "loss"):
        png = rep.plots[name]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(png) as im:
            assert im.width > 300 and im.height > 200
            # not a blank canvas: lines were drawn
            assert len(np.unique(np.asarray(im.convert("L")))) > 10
        assert f"]({png.name})" in rep.markdown.read_text()


def test_seeds_mean_and_sample_std(tmp_path):
    accs = [0.5, 0.62, 0.71]
    probes = [0.3, 0.35, 0.5]
    for k, (acc, pv) in enumerate(zip(accs, probes)):
        _write_run(tmp_path / "sweep" / f"seed-{k}", seed=k, test_acc=acc, probe_v=pv)
    rep = report.write_report([tmp_path / "sweep"], tmp_path / "out")

    assert len(rep.groups) == 1 and rep.table[0]["n"] == 3
    row = rep.table[0]
    assert row["acc"][0] == pytest.approx(statistics.mean(accs))
    assert row["acc"][1] == pytest.approx(statistics.stdev(accs))
    assert row["probe_v"][0] == pytest.approx(statistics.mean(probes))
    assert row["probe_v"][1] == pytest.approx(statistics.stdev(probes))
    _head, rows = _parse_table(rep.markdown.read_text())
    assert rows == [["sweep", "3", f"{100 * statistics.mean(accs):.1f} ± {100 * statistics.stdev(accs):.1f}",
                     *rows[0][3:]]]


def test_grouping_by_config_ignores_seed_and_output(tmp_path):
    runs = [_write_run(tmp_path / f"a{k}", seed=k) for k in range(2)]
    runs.append(_write_run(tmp_path / "b0", seed=0, modulation="none"))
    groups = report.group_runs([report.read_run(r) for r in runs])
    assert [len(g.runs) for g in groups] == [2, 1]


def test_selection_falls_back_to_best_val_epoch_without_summary(tmp_path):
    run = report.read_run(_write_run(tmp_path / "r", seed=0, test_acc=0.8, summary=False))
    vals = report.run_values(run)
    assert vals["epoch"] == 1 and vals["acc"] == pytest.approx(0.8)


def test_bad_folders_name_the_file(tmp_path):
    with pytest.raises(RunFolderError, match="not a run folder|neither"):
        report.write_report([tmp_path], tmp_path / "out")
    run = _write_run(tmp_path / "r", seed=0)
    (run / "metrics.jsonl").write_text('{"epoch": 0}\nnot json\n{"epoch": 2}\n')
    with pytest.raises(RunFolderError, match=r"metrics.jsonl:2"):
        report.read_run(run)
    # a torn last line (run killed mid-write) is dropped, not an error
    (run / "metrics.jsonl").write_text('{"epoch": 0}\n{"epo')
    assert len(report.read_run(run).metrics) == 1


def test_mean_std_edge_cases():
    from ogmge_train.stats import mean_std

    assert mean_std([]) == (None, None)
    # one value: no measured spread, so no std (the table prints no "± 0.0")
    assert mean_std([None, 0.4]) == (0.4, None)
    assert report.format_cell("acc", (0.4, None)) == "40.0"
    assert report.format_cell("acc", (0.4, 0.0)) == "40.0 ± 0.0"
    assert report.format_cell("epoch", (3.0, None)) == "3"


def test_two_seeds_with_equal_values_print_their_zero_spread(tmp_path):
    """The legend says a cell without ± is one seed: two seeds that agree print "± 0.0"
    (issue 24: the selected-epoch cell of two seeds selecting the same epoch had no ±)."""
    for k in range(2):
        _write_run(tmp_path / "sweep" / f"seed-{k}", seed=k, test_acc=0.5)
    rep = report.write_report([tmp_path / "sweep"], tmp_path / "out")
    _head, rows = _parse_table(rep.markdown.read_text())
    assert rows[0][1] == "2" and rows[0][2] == "50.0 ± 0.0" and rows[0][8] == "1.0 ± 0.0"
    assert all("±" in cell for cell in rows[0][2:] if cell != "—")
    assert report.format_cell("epoch", (3.0, 0.0)) == "3.0 ± 0.0"


# ----------------------------------------------------------------------------- the linear probe

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real (tiny) run: synthetic CREMA-D with a clean visual cue, extracted, trained 1 epoch."""
    from avprep.config import ExtractConfig, spec_preset
    from avprep.extract import extract
    from avprep.synth import make_dataset
    from ogmge_train.config import resolve
    from ogmge_train.train import train

    root = tmp_path_factory.mktemp("probe")
    make_dataset("cremad", root / "raw", 36, num_classes=3, duration=1.0, fps=2, size=(32, 24),
                 audio_snr=-30.0, visual_snr=10.0)
    spec = spec_preset("paper", "cremad", n_fft=64, win_length=64, hop_length=400, duration=1.0)
    # hash-split seed 3 puts 6 of these clips in test and 2 in val
    extract("cremad", root / "raw", root / "shards", ExtractConfig(spec, frame_size=24), workers=1, seed=3)
    cfg = resolve("demo", shards=str(root / "shards"), out=str(root / "run"), epochs=1, batch_size=8,
                  image_size=24, modulation="none")
    train(cfg)
    return root / "run"


def test_probe_returns_accuracies_and_writes_json(tiny_run):
    from ogmge_train import probe as probe_mod
    from ogmge_train.probe import probe

    stages = []
    res = probe(tiny_run, "visual", steps=50, on_progress=lambda s, d, t: stages.append((s, d, t)))
    on_disk = json.loads((tiny_run / "probe_visual.json").read_text())
    assert on_disk == json.loads(json.dumps(res.results))
    n_test = json.loads((tiny_run.parent / "shards" / "test.manifest.json").read_text())["num_samples"]
    assert on_disk["test"]["n"] == n_test and 0.0 <= on_disk["test"]["acc"] <= 1.0
    assert on_disk["feature_dim"] == 128 and on_disk["l2"] in probe_mod.L2_GRID
    # the visual cue is clean: even a barely trained encoder's features separate 3 classes
    assert on_disk["train"]["acc"] > 0.9
    assert ("features:train", on_disk["train"]["n"], on_disk["train"]["n"]) in stages
    # the fit is convex from a zero start: a rerun gives the same numbers
    again = probe(tiny_run, "visual", steps=50).results
    assert again == res.results
    # the report picks the probe up
    assert report.run_values(report.read_run(tiny_run))["probe_v"] == pytest.approx(on_disk["test"]["acc"])


def test_fit_linear_matches_an_independent_logistic_regression():
    """L-BFGS on standardised features reaches the optimum of the same convex objective that
    scipy's L-BFGS-B finds (independent implementation)."""
    import torch
    from scipy.optimize import minimize
    from scipy.special import logsumexp

    from ogmge_train.probe import fit_linear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 5, generator=g) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0]) + 1.0
    y = (x[:, 0] + x[:, 1] > 2).long() + (x[:, 3] > 2).long()
    l2 = 1e-2
    model = fit_linear(x, y, 3, l2=l2, steps=200)

    xs = ((x - x.mean(0)) / x.std(0, unbiased=False)).double().numpy()
    yn = y.numpy()

    def objective(theta):
        w, b = theta[:15].reshape(3, 5), theta[15:]
        z = xs @ w.T + b
        return np.mean(logsumexp(z, axis=1) - z[np.arange(len(yn)), yn]) + 0.5 * l2 * np.sum(w ** 2)

    ref = minimize(objective, np.zeros(18), method="L-BFGS-B", options={"maxiter": 5000, "gtol": 1e-10})
    ours = np.concatenate([model.fc.weight.detach().double().numpy().ravel(), model.fc.bias.detach().double().numpy()])
    assert objective(ours) == pytest.approx(ref.fun, abs=1e-6)
    # softmax is invariant to a shared bias shift: compare weights, and logits up to that shift
    np.testing.assert_allclose(ours[:15], ref.x[:15], atol=1e-3)


def test_probe_refuses_a_missing_encoder(tiny_run, tmp_path):
    from ogmge_train.config import TrainConfig
    from ogmge_train.errors import ConfigError
    from ogmge_train.probe import probe
    from ogmge_train.train import train

    with pytest.raises(ValueError, match="modality"):
        probe(tiny_run, "smell")
    cfg = TrainConfig.from_dict(json.loads((tiny_run / "config.json").read_text()))
    audio_only = tmp_path / "audio-only"
    train(dataclasses.replace(cfg, out=str(audio_only), modality="audio"))
    with pytest.raises(ConfigError, match="no visual encoder"):
        probe(audio_only, "visual")
    assert not (audio_only / "probe_visual.json").exists()


def test_sweep_runs_each_seed_once_and_aggregates(tiny_run, tmp_path):
    from ogmge_train.config import TrainConfig
    from ogmge_train.sweep import aggregate, parse_seeds, sweep

    cfg = TrainConfig.from_dict(json.loads((tiny_run / "config.json").read_text()))
    cfg = dataclasses.replace(cfg, out=str(tmp_path / "sw"))
    seen = []
    summaries = sweep(cfg, parse_seeds("0-1"), on_run=lambda i, n, s, folder: seen.append((i, n, s, folder.name)))
    assert seen == [(0, 2, 0, "seed-0"), (1, 2, 1, "seed-1")]
    assert [json.loads((tmp_path / "sw" / f"seed-{k}" / "config.json").read_text())["seed"] for k in (0, 1)] == [0, 1]
    row = aggregate(tmp_path / "sw")
    accs = [s["test"]["acc"] for s in summaries]
    assert row["n"] == 2 and row["acc"][0] == pytest.approx(statistics.mean(accs))
    assert row["acc"][1] == pytest.approx(statistics.stdev(accs))
    # a finished seed is not trained again
    stamp = (tmp_path / "sw" / "seed-0" / "last.pt").stat().st_mtime_ns
    assert sweep(cfg, [0, 1]) == summaries
    assert (tmp_path / "sw" / "seed-0" / "last.pt").stat().st_mtime_ns == stamp


def test_sweep_runs_can_be_evaluated_and_probed_from_any_directory(tiny_run, tmp_path, monkeypatch):
    """A sweep given a relative --shards records it absolute, as train does (issue 13)."""
    from ogmge_train.config import TrainConfig
    from ogmge_train.probe import probe
    from ogmge_train.sweep import sweep
    from ogmge_train.train import evaluate

    root = tiny_run.parent
    cfg = TrainConfig.from_dict(json.loads((tiny_run / "config.json").read_text()))
    monkeypatch.chdir(root)
    sweep(dataclasses.replace(cfg, shards="shards", out=str(tmp_path / "sw")), [0])
    seed0 = tmp_path / "sw" / "seed-0"
    assert json.loads((seed0 / "config.json").read_text())["shards"] == str(root / "shards")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    n_test = json.loads((root / "shards" / "test.manifest.json").read_text())["num_samples"]
    metrics = evaluate(seed0, split="test", device="cpu", workers=0)
    assert 0.0 <= metrics["acc"] <= 1.0
    assert probe(seed0, "visual", steps=5).results["test"]["n"] == n_test
    assert (seed0 / "probe_visual.json").is_file()


def _captured_figures(monkeypatch):
    figs = {}
    real = report._save

    def save(fig, path):
        figs[Path(path).name] = fig
        return real(fig, path)

    monkeypatch.setattr(report, "_save", save)
    return figs


def test_legend_never_covers_a_panel_and_rho_marks_the_window(tmp_path, monkeypatch):
    figs = _captured_figures(monkeypatch)
    runs = [_write_run(tmp_path / "runs" / name, seed=0, modulation=m)
            for name, m in (("base", "none"), ("ogm", "ogm-ge"), ("other", "ogm"))]
    for r in runs[1:]:
        cfg = json.loads((r / "config.json").read_text())
        (r / "config.json").write_text(json.dumps({**cfg, "modulation_start": 0, "modulation_end": 1}))
    report.write_report(runs, tmp_path / "out")
    for name in ("accuracy.png", "rho.png", "loss.png"):
        fig = figs[name]
        fig.canvas.draw()
        (legend,) = fig.legends
        box = legend.get_window_extent()
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent()), f"{name}: the legend covers a panel"
    ax = figs["rho.png"].axes[0]
    # the fabricated steps have rho_a > 1: audio dominates, so rho_a is plotted
    assert ax.get_ylabel() == "rho_a"
    spans = [p for p in ax.patches if p.get_label().startswith("modulated")]
    assert [p.get_label() for p in spans] == ["modulated (epochs 0–1)"]


def test_rho_plot_follows_the_dominant_modality(tmp_path):
    run = _write_run(tmp_path / "v", seed=0)
    steps = [{"epoch": 0, "step": s, "loss": 1.0, "rho_a": 0.5, "rho_v": 2.0, "k_a": 1.0, "k_v": 0.3}
             for s in range(4)]
    (run / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    groups = report.group_runs([report.read_run(run)])
    assert report.dominant_modality(groups) == "visual"


def _text_outside_canvas(fig) -> list[str]:
    """Text of a drawn figure that reaches outside its canvas (1 px slack): the suptitle, legend
    entries and axis titles/labels one by one, and everything drawn (tick labels in view
    included) through the figure's tight bounding box."""
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    texts = [fig._suptitle] if fig._suptitle is not None else []
    texts += [t for leg in fig.legends for t in leg.get_texts()]
    texts += [t for ax in fig.axes for t in (ax.title, ax.xaxis.label, ax.yaxis.label)]
    out = []
    for t in texts:
        if not t.get_visible() or not t.get_text().strip():
            continue
        e = t.get_window_extent(renderer)
        if e.x0 < box.x0 - 1 or e.y0 < box.y0 - 1 or e.x1 > box.x1 + 1 or e.y1 > box.y1 + 1:
            out.append(t.get_text())
    tight = fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans)
    if tight.x0 < box.x0 - 1 or tight.y0 < box.y0 - 1 or tight.x1 > box.x1 + 1 or tight.y1 > box.y1 + 1:
        out.append(f"drawn artists reach {tight.bounds} on a canvas of {box.bounds}")
    return out


@pytest.mark.parametrize("seeds", [1, 2, 3, 10])
def test_seed_bars_keep_title_and_legend_inside_the_canvas(tmp_path, monkeypatch, seeds):
    """precondition.png with few seeds clipped its title and legend (issue 24)."""
    figs = _captured_figures(monkeypatch)
    series = {label: {s: 0.5 + 0.01 * s for s in range(seeds)} for label in
              ("visual-only (visual model)", "concat: its visual probe", "concat+ogm-ge: its visual probe")}
    report.plot_seed_bars(series, tmp_path / "pre.png",
                          "precondition: visual linear-probe test accuracy, visual-only model vs inside concat")
    fig = figs["pre.png"]
    fig.canvas.draw()
    assert _text_outside_canvas(fig) == []
    assert fig.legends and len(fig.legends[0].get_texts()) == 3


def test_one_epoch_runs_get_integer_ticks_and_no_band_past_the_run(tmp_path, monkeypatch):
    """A one-epoch run: x ticks are whole epochs (not -0.045 ...) and the modulation band
    (configured for epochs 0-4) stops where the run stopped (issue 24)."""
    figs = _captured_figures(monkeypatch)
    runs = [_write_run(tmp_path / "runs" / name, seed=0, modulation=m, epochs=1, summary=False)
            for name, m in (("base", "none"), ("ogm", "ogm-ge"))]
    cfg = json.loads((runs[1] / "config.json").read_text())
    (runs[1] / "config.json").write_text(json.dumps({**cfg, "modulation_start": 0, "modulation_end": 4}))
    report.write_report(runs, tmp_path / "out")
    for name in ("accuracy.png", "rho.png", "loss.png"):
        fig = figs[name]
        fig.canvas.draw()
        assert _text_outside_canvas(fig) == [], name
        for ax in fig.axes:
            lo, hi = ax.get_xlim()
            ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
            assert ticks and all(float(t).is_integer() for t in ticks), (name, ticks)
    ax = figs["rho.png"].axes[0]
    (band,) = [p for p in ax.patches if p.get_label().startswith("modulated")]
    x0, x1 = band.get_x(), band.get_x() + band.get_width()
    assert (x0, x1) == (0, 1) and ax.get_xlim()[1] <= 1
    assert band.get_label() == "modulated (epochs 0–0)"


@pytest.mark.parametrize("epochs", [1, 15])
def test_mechanism_plot_keeps_text_inside_whole_epoch_ticks_and_the_band_within_the_run(
        tmp_path, monkeypatch, epochs):
    """mechanism.png (issue 20): every text inside the canvas, whole-epoch ticks even for a
    one-epoch run, the modulated band (configured for epochs 0-7) ending where the run ends, and
    a panel with nothing recorded saying so instead of an empty axis."""
    figs = _captured_figures(monkeypatch)
    curves = {name: {"rho_a": {e: 2.0 + 0.1 * e for e in range(epochs)},
                     "k_a": {e: scale for e in range(epochs)}, "k_v": {e: 1.0 for e in range(epochs)},
                     "update_norm_a": {e: 0.1 * scale for e in range(epochs)},
                     "update_norm_v": {e: None for e in range(epochs)}}
              for name, scale in (("concat", 1.0), ("concat+ogm-ge", 0.2), ("control-ogm-strong", 0.01))}
    report.plot_mechanism(curves, tmp_path / "mechanism.png", window=(0, 7), whole_run={"control-ogm-strong"})
    fig = figs["mechanism.png"]
    fig.canvas.draw()
    assert _text_outside_canvas(fig) == []
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        assert hi <= epochs - 0.5 + 1e-9
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        for band in (p for p in ax.patches if p.get_label().startswith("modulated")):
            assert band.get_x() + band.get_width() <= min(7, epochs - 1) + 0.5 + 1e-9
    (visual,) = [ax for ax in fig.axes if ax.get_title() == "visual encoder update per step"]
    assert [t.get_text() for t in visual.texts] == ["not recorded by this build"]
    assert {t.get_text() for t in fig.legends[0].get_texts()} >= {"concat", "concat+ogm-ge", "control-ogm-strong"}


@pytest.mark.parametrize("rows", [1, 4, 26])
def test_contrast_plot_keeps_every_label_inside_the_canvas(tmp_path, monkeypatch, rows):
    """effects.png with the demo's 4 contrasts and compare's ~26: no label or title cut."""
    figs = _captured_figures(monkeypatch)
    contrasts = {f"concat+method-with-a-long-name-{i} − concat": {"diffs": [0.01 * i, 0.02, -0.01], "mean": 0.01,
                                                                  "ci": (-0.01, 0.03)} for i in range(rows)}
    report.plot_contrasts(contrasts, tmp_path / "effects.png",
                          "primary endpoint: fused test accuracy at the last epoch, paired differences by seed")
    fig = figs["effects.png"]
    fig.canvas.draw()
    assert _text_outside_canvas(fig) == []
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == list(reversed(contrasts))
