"""`reproduce`: the paper's seven tables as data, and Tables 1, 2, 6, 7 run on tiny synthetic
shards next to the paper's values (both selections: on validation and the best test epoch)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from ogmge_train import reproduce as rp
from ogmge_train.errors import ConfigError
from ogmge_train.names import SELECTION_LABELS

TINY = {"epochs": 1, "batch_size": 4, "image_size": 24, "arch": "small", "workers": 0, "device": "cpu"}
# The paper's own file (copied from the paper, outside the repository; never committed).
SHARED_TABLES = Path(__file__).resolve().parents[1].parent / "shared" / "paper" / "tables.json"
# its dataset names -> ours
DATASET_OF = {"cremad": "cremad", "ks": "kinetics-sounds", "vggsound": "vggsound", "ave": "ave"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """36 clips of a 3-class synthetic CREMA-D: 28 train, 2 val, 6 test."""
    from avprep.config import ExtractConfig, spec_preset
    from avprep.extract import extract
    from avprep.synth import make_dataset

    root = tmp_path_factory.mktemp("repro")
    make_dataset("cremad", root / "raw", 36, num_classes=3, duration=1.0, fps=2, size=(32, 24),
                 audio_snr=0.0, visual_snr=0.0)
    spec = spec_preset("paper", "cremad", n_fft=64, win_length=64, hop_length=400, duration=1.0)
    extract("cremad", root / "raw", root / "shards", ExtractConfig(spec, frame_size=24), workers=1, seed=3)
    return root / "shards"


def read_json(path):
    return json.loads(Path(path).read_text())


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- the paper as data

def test_manifest_holds_all_seven_tables_and_runnable_rows_are_its_rows():
    tables = rp.paper_tables()["tables"]
    assert sorted(map(int, tables)) == list(range(1, 8))
    for t, rows in rp.TABLE_ROWS.items():
        not_built = rp.NOT_BUILT_ROWS.get(t, {})
        assert [r.name for r in rows if r.paper_row is None] == \
            [n for n in tables[str(t)]["rows"] if n not in not_built], t
        assert all(r.paper_row in tables[str(t)]["rows"] for r in rows if r.paper_row is not None), t
        assert all(rp.unavailable(r.name, r.settings) is None for r in rows)
        assert all(r.vs is None or r.vs in {x.name for x in rows} for r in rows)
    assert rp.NOT_RUNNABLE == {} and sorted(rp.TABLE_ROWS) == list(range(1, 8))
    assert set(rp.NOT_BUILT_ROWS) == {4} and set(rp.NOT_BUILT_ROWS[4]) == {"i-vector", "i-vector+ogm-ge", "mwtsm",
                                                                           "mwtsm+ogm-ge"}
    assert rp.table_datasets(1) == ["cremad", "vggsound"] and rp.table_datasets(2) == ["cremad", "kinetics-sounds"]
    assert rp.table_datasets(6) == ["cremad", "kinetics-sounds", "vggsound"] and rp.table_datasets(7) == \
        ["cremad", "vggsound"]
    assert {d: rp.PRESET_OF_DATASET[d] for d in ("cremad", "kinetics-sounds", "vggsound")} == \
        {"cremad": "paper-cremad", "kinetics-sounds": "paper-ks", "vggsound": "paper-vggsound"}
    # Table 1's "Baseline" is the gated fusion, and its row says so
    assert "gated" in tables["1"]["rows"]["gated"]["label"] and "Baseline" in tables["1"]["rows"]["gated"]["label"]
    assert rp.paper_values(1, "vggsound")["gated"] == {"acc": 48.4, "map": 51.7}
    assert rp.paper_values(1, "cremad")["audio-only"] == {"acc": 52.5, "map": 54.2}
    assert rp.paper_values(2, "kinetics-sounds")["concat+ogm-ge"] == {"acc": 62.3}
    assert rp.paper_values(6, "kinetics-sounds")["sgd+ogm-ge"] == {"acc": 63.1}   # the paper prints both
    assert rp.paper_values(2, "vggsound")["concat"] == {}                          # no such column


def test_manifest_equals_the_papers_file():
    if not SHARED_TABLES.is_file():
        pytest.skip(f"{SHARED_TABLES} is not here")
    theirs = json.loads(SHARED_TABLES.read_text())["tables"]
    ours = rp.paper_tables()["tables"]
    assert set(ours) == set(theirs)
    for t, tab in theirs.items():
        cols = [f"{DATASET_OF[c.partition('.')[0]]}.{c.partition('.')[2]}" for c in tab["columns"]]
        assert ours[t]["columns"] == cols, t
        assert {k: v["values"] for k, v in ours[t]["rows"].items()} == tab["rows"], t
        assert list(ours[t]["rows"]) == list(tab["rows"]), t                     # the paper's row order


def test_listing_names_every_table_row_and_value():
    listed = {t["table"]: t for t in rp.listing()}
    assert sorted(listed) == list(range(1, 8))
    for t, tab in rp.paper_tables()["tables"].items():
        got = listed[int(t)]
        assert [r["name"] for r in got["rows"]] == list(tab["rows"])
        assert [list(r["values"].values()) for r in got["rows"]] == [r["values"] for r in tab["rows"].values()]
        assert got["reason"] is None                    # every table runs here
        built = {r.name for r in rp.TABLE_ROWS[int(t)]}
        assert all((r["reason"] is None) == (r["name"] in built) for r in got["rows"])


def test_list_command_prints_every_value(capsys):
    from click.testing import CliRunner

    from cli.train_cli import main

    result = CliRunner().invoke(main, ["reproduce", "--list"])
    assert result.exit_code == 0, result.output
    text = result.output
    for t in rp.listing():
        assert f"Table {t['table']}: {t['title']}" in text
        section = text.split(f"Table {t['table']}:")[1].split("\nTable ")[0]
        assert ("reproduce runs it" in section.splitlines()[0]) == (t["reason"] is None)
        for r in t["rows"]:
            line = next(ln for ln in section.splitlines()[1:] if f" {r['name']} " in ln and r["label"] in ln)
            assert [f"{v:.1f}" in line for v in r["values"].values()] == [True] * len(r["values"])
    assert "not built: i-vector, i-vector+ogm-ge: i-vector (Heracleous & Yoneyama 2019)" in text
    assert "not built: mwtsm, mwtsm+ogm-ge: MWTSM" in text


def test_reproduce_refuses_what_it_cannot_or_must_not_do(shards, tmp_path):
    out = tmp_path / "fail"
    with pytest.raises(ConfigError, match="--table must be one of 1, 2, 3, 4, 5, 6, 7"):
        rp.reproduce(8, str(shards), out, seeds=[0])
    with pytest.raises(ConfigError, match="rows this build cannot run: i-vector"):
        rp.reproduce(4, str(shards), out, seeds=[0], overrides=TINY, missing="fail")
    with pytest.raises(ConfigError, match="Table 6's rows set --optimizer; it cannot be overridden"):
        rp.reproduce(6, str(shards), out, seeds=[0], overrides={**TINY, "optimizer": "adam"})
    with pytest.raises(ConfigError, match="no setting"):
        rp.reproduce(2, str(shards), out, seeds=[0], overrides={"bogus": 1})
    assert not out.exists()


# ----------------------------------------------------------------------------- running tables

def _check_both_selections(out, row, seeds, entry):
    """reproduce.json's two columns: test acc at the best val epoch and at the best test epoch."""
    for on in ("val", "test"):
        want = []
        for s in seeds:
            records = metrics(out / "runs" / row / f"seed-{s}")
            best = max(records, key=lambda m: m[on]["acc"])
            want.append(best["test"]["acc"])
        assert entry[on]["acc"][0] == pytest.approx(sum(want) / len(want))


def test_reproduce_tables_6_and_7_end_to_end(shards, tmp_path):
    """Two seeds, one epoch: every row runs with its settings; the reports show the paper's values."""
    out6, events = tmp_path / "t6", []
    res6 = rp.reproduce(6, str(shards), out6, seeds=[0, 1], overrides=TINY, on_event=events.append)
    assert [r["name"] for r in res6.rows] == ["sgd", "sgd+ogm-ge", "adam", "adam+ogm-ge"] and not res6.skipped
    assert [(e["row"], e["seed"], e["kept"]) for e in events if e["event"] == "run"] == \
        [(r, s, False) for r in ("sgd", "sgd+ogm-ge", "adam", "adam+ogm-ge") for s in (0, 1)]
    for row, opt, method in (("sgd", "sgd", "none"), ("adam+ogm-ge", "adam", "ogm-ge")):
        cfg = read_json(out6 / "runs" / row / "seed-1" / "config.json")
        assert (cfg["optimizer"], cfg["modulation"], cfg["fusion"], cfg["lr"], cfg["weight_decay"], cfg["seed"]) == \
            (opt, method, "concat", 1e-3, 1e-4, 1)
    # the Adam choice, as built: torch.optim.Adam, lr 1e-3, PyTorch's betas, L2 weight decay 1e-4
    group = torch.load(out6 / "runs" / "adam" / "seed-0" / "last.pt", weights_only=True)["optimizer"]["param_groups"][0]
    assert (group["lr"], tuple(group["betas"]), group["weight_decay"]) == (1e-3, (0.9, 0.999), 1e-4)
    assert "momentum" not in group
    by = {r["name"]: r for r in read_json(res6.numbers)["rows"]}
    assert by["adam"]["paper"] == {"acc": 49.7} and by["adam"]["vs"]["row"] == "sgd"
    _check_both_selections(out6, "adam+ogm-ge", [0, 1], by["adam+ogm-ge"])
    md6 = res6.report.read_text()
    assert rp.ADAM_CHOICE in md6
    against = md6[md6.index("## Against the paper"):]
    line = next(ln for ln in against.splitlines() if ln.startswith("| adam+ogm-ge |"))
    assert "| 54.6 |" in line and "vs `adam`" in line

    out7 = tmp_path / "t7"
    res7 = rp.reproduce(7, str(shards), out7, seeds=[0, 1], overrides=TINY)
    grid = {r["name"]: (r["batch_size"], r["lr"]) for r in res7.rows}
    assert grid == {"b64-lr1e-4": (4, 1e-4), "b64-lr5e-4": (4, 5e-4), "b64-lr1e-3": (4, 1e-3),
                    "b128-lr1e-3": (8, 1e-3), "b256-lr1e-3": (16, 1e-3), "b64-lr1e-3+ge": (4, 1e-3),
                    "b64-lr1e-3+ge-paper-noise": (4, 1e-3)}
    for name, (batch, lr) in grid.items():
        cfg = read_json(out7 / "runs" / name / "seed-0" / "config.json")
        assert (cfg["batch_size"], cfg["lr"]) == (batch, lr)
        assert cfg["modulation"] == ("ge" if "+ge" in name else "none")
        assert cfg["ge_noise"] == ("paper" if name.endswith("paper-noise") else "code")
        steps = [json.loads(x) for x in (out7 / "runs" / name / "seed-0" / "steps.jsonl").read_text().splitlines()]
        assert len(steps) == 28 // batch                       # 28 train clips, full batches only
    md7 = res7.report.read_text()
    for name, value in (("b64-lr1e-4", "50.4"), ("b256-lr1e-3", "48.6"), ("b64-lr1e-3+ge", "60.2"),
                        ("b64-lr1e-3+ge-paper-noise", "60.2")):
        line = next(ln for ln in md7.splitlines() if ln.startswith(f"| {name} (batch"))
        assert f"| {value} |" in line
    assert f"acc, {SELECTION_LABELS['test']}" in md7


def test_reproduce_table_2_end_to_end(shards, tmp_path):
    out = tmp_path / "t2"
    events = []
    res = rp.reproduce(2, str(shards), out, seeds=[0, 1], overrides={**TINY, "gb_super_epoch": 1},
                       on_event=events.append)
    ran = [r["name"] for r in res.rows]
    assert ran == [r.name for r in rp.TABLE_ROWS[2]] and res.skipped == {}
    cfg = read_json(out / "runs" / "concat+modality-drop-visual" / "seed-1" / "config.json")
    # the paper's CREMA-D preset (alpha 0.8, SGD, lr step 70), the row (input drop), then the overrides
    assert (cfg["alpha"], cfg["optimizer"], cfg["lr_step"], cfg["epochs"], cfg["seed"]) == (0.8, "sgd", 70, 1, 1)
    assert (cfg["modulation"], cfg["drop_modality"], cfg["drop_at"]) == ("modality-drop", "visual", "input")
    numbers = read_json(res.numbers)
    assert numbers["dataset"] == "cremad" and numbers["preset"] == "paper-cremad" and numbers["select_on"] == "val"
    by = {r["name"]: r for r in numbers["rows"]}
    ogm = [read_json(out / "runs" / "concat+ogm" / f"seed-{s}" / "summary.json") for s in (0, 1)]
    base = [read_json(out / "runs" / "concat" / f"seed-{s}" / "summary.json") for s in (0, 1)]
    diffs = [a["test"]["acc"] - b["test"]["acc"] for a, b in zip(ogm, base)]
    assert by["concat+ogm"]["vs"]["row"] == "concat" and by["concat+ogm"]["vs"]["n"] == 2
    assert by["concat+ogm"]["vs"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert by["concat+ogm"]["val"]["acc"][0] == pytest.approx(sum(s["test"]["acc"] for s in ogm) / 2)
    assert by["concat+gradient-blending"]["paper"] == {"acc": 56.8}
    _check_both_selections(out, "concat+ogm-ge", [0, 1], by["concat+ogm-ge"])
    assert "vs" not in by["concat"]
    md = res.report.read_text()
    against = md[md.index("## Against the paper"):]
    line = next(ln for ln in against.splitlines() if ln.startswith("| concat+ogm |"))
    assert "| 59.0 |" in line and "vs `concat`" in line
    # a rerun keeps every finished seed, and says so
    stamp = (out / "runs" / "concat" / "seed-0" / "last.pt").stat().st_mtime_ns
    again = []
    res2 = rp.reproduce(2, str(shards), out, seeds=[0, 1], overrides={**TINY, "gb_super_epoch": 1},
                        on_event=again.append)
    assert (out / "runs" / "concat" / "seed-0" / "last.pt").stat().st_mtime_ns == stamp
    assert not [e for e in again if e["event"] == "start"]       # no training started
    assert all(e["kept"] for e in again if e["event"] == "run")
    assert res2.kept == [(r, s) for r in ran for s in (0, 1)]
    assert "Kept from an earlier run (finished, not retrained): concat seed 0, concat seed 1" in \
        res2.report.read_text()


def test_select_on_test_is_labelled_in_the_report(shards, tmp_path):
    """Table 1's unimodal rows with the reference code's protocol: best.pt is the best test epoch
    and every cell of the generic table says so."""
    out = tmp_path / "t1-test"
    res = rp.reproduce(1, str(shards), out, seeds=[0], overrides={**TINY, "epochs": 2, "select_on": "test"})
    for row in ("audio-only", "gated+ogm-ge"):
        run = out / "runs" / row / "seed-0"
        summary, records = read_json(run / "summary.json"), metrics(run)
        best = max(records, key=lambda m: m["test"]["acc"])
        assert summary["selection"] == "test_acc" and summary["selected_epoch"] == best["epoch"]
        assert summary["selection_label"] == SELECTION_LABELS["test"] == "best test epoch, as the reference code"
    cfg = read_json(out / "runs" / "audio-only" / "seed-0" / "config.json")
    assert (cfg["modality"], cfg["modulation"]) == ("audio", "none")
    md = res.report.read_text()
    table = md[md.index("| run |"):md.index("## Against the paper")]
    body = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| run |")]
    assert len(body) == 10
    for ln in body:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        numbers = [c for c in cells[2:] if c != "—"]
        assert numbers and all(c.endswith("(best test epoch, as the reference code)") for c in numbers), ln
    assert "paired Δ acc (best test epoch, as the reference code) vs" in md
    assert read_json(res.numbers)["select_on"] == "test"


def test_reproduce_command_reports_and_says_what_it_kept(shards, tmp_path):
    from click.testing import CliRunner

    from cli.train_cli import main

    out = tmp_path / "cli-t7"
    args = ["reproduce", "--table", "7", "--shards", str(shards), "--out", str(out), "--seeds", "0",
            "--epochs", "1", "--batch-size", "4", "--image-size", "24", "--arch", "small", "--workers", "0",
            "--device", "cpu"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    runs = [line for line in result.output.splitlines() if ", seed 0 (" in line]
    rows = [r.name for r in rp.TABLE_ROWS[7]]
    assert runs[0] == f"{rows[0]}, seed 0 (1/{len(rows)})"        # then an ETA from the runs trained so far
    assert re.fullmatch(rf"{re.escape(rows[1])}, seed 0 \(2/{len(rows)}\), ETA 0:\d\d:\d\d for the "
                        rf"{len(rows) - 1} left", runs[1]), runs
    numbers = read_json(out / "reproduce.json")
    assert [r["name"] for r in numbers["rows"]] == [r.name for r in rp.TABLE_ROWS[7]] and numbers["seeds"] == [0]
    assert "60.2" in (out / "report.md").read_text()               # the paper's GE-alone value
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert "b64-lr1e-4, seed 0 (1/7): kept (finished by an earlier run)" in again.output
    assert "kept 7 finished row/seed run(s)" in again.output
    bad = CliRunner().invoke(main, ["reproduce", "--table", "4", "--shards", str(shards), "--out", str(out),
                                    "--missing", "fail"])
    assert bad.exit_code == 2 and "rows this build cannot run: i-vector" in bad.output
    assert CliRunner().invoke(main, ["reproduce", "--shards", str(shards)]).exit_code == 2


# ----------------------------------------------------------------------------- Tables 3-5 (other frameworks)

@pytest.fixture(scope="module")
def ks_shards(tmp_path_factory):
    """A 3-class synthetic Kinetics-Sounds of 2 s clips (Table 3's dataset)."""
    from avprep.config import ExtractConfig, spec_preset
    from avprep.extract import extract
    from avprep.synth import make_dataset

    root = tmp_path_factory.mktemp("repro-ks")
    make_dataset("kinetics-sounds", root / "raw", 30, num_classes=3, duration=2.0, fps=2, size=(32, 24),
                 split_folders=True)
    spec = spec_preset("paper", "kinetics-sounds", n_fft=64, win_length=64, hop_length=400, duration=2.0)
    extract("kinetics-sounds", root / "raw", root / "shards", ExtractConfig(spec, frame_size=24), workers=1)
    return root / "shards"


def _against(md: str, row: str) -> str:
    against = md[md.index("## Against the paper"):]
    return next(ln for ln in against.splitlines() if ln.startswith(f"| {row} |"))


def test_reproduce_table_3_end_to_end(ks_shards, tmp_path):
    out = tmp_path / "t3"
    res = rp.reproduce(3, str(ks_shards), out, seeds=[0, 1], overrides={**TINY, "tbn_window": 8})
    assert [r["name"] for r in res.rows] == [r.name for r in rp.TABLE_ROWS[3]] and res.skipped == {}
    by = {r["name"]: r for r in read_json(res.numbers)["rows"]}
    assert by["tbn+ogm-ge"]["paper"] == {"acc": 63.1} and by["tsn-av"]["paper"] == {"acc": 58.6}
    assert by["psp+ogm-ge"]["vs"]["row"] == "psp" and by["psp+ogm-ge"]["vs"]["n"] == 2
    cfg = read_json(out / "runs" / "tsm-av+ogm-ge" / "seed-1" / "config.json")
    assert (cfg["model"], cfg["modulation"], cfg["frames"], cfg["seed"]) == ("tsm-av", "ogm-ge", 3, 1)
    md = res.report.read_text()
    assert "| 63.1 |" in _against(md, "tbn+ogm-ge") and "vs `tbn`" in _against(md, "tbn+ogm-ge")
    assert "| 58.6 |" in _against(md, "tsn-av")


def test_reproduce_table_4_runs_the_x_vector_and_names_what_is_not_built(shards, tmp_path):
    events = []
    res = rp.reproduce(4, str(shards), tmp_path / "t4", seeds=[0, 1], overrides=TINY, on_event=events.append)
    assert [r["name"] for r in res.rows] == ["x-vector", "x-vector+ogm-ge"]
    assert set(res.skipped) == {"i-vector", "i-vector+ogm-ge", "mwtsm", "mwtsm+ogm-ge"}
    assert {e["row"] for e in events if e["event"] == "skip"} == set(res.skipped)
    assert "| 57.1 |" in _against(res.report.read_text(), "x-vector+ogm-ge")
    assert read_json(tmp_path / "t4" / "runs" / "x-vector" / "seed-0" / "config.json")["audio_arch"] == "xvector"


def test_reproduce_table_5_from_the_cli(ave_shards, tmp_path):
    from click.testing import CliRunner

    from cli.train_cli import main

    out = tmp_path / "t5"
    args = ["reproduce", "--table", "5", "--shards", str(ave_shards), "--out", str(out), "--seeds", "0,1",
            "--epochs", "1", "--batch-size", "4", "--image-size", "24", "--arch", "small", "--workers", "0",
            "--device", "cpu"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    numbers = read_json(out / "reproduce.json")
    assert numbers["preset"] == "paper-ave-loc" and numbers["dataset"] == "ave"
    assert [r["name"] for r in numbers["rows"]] == ["avga", "avga+ogm-ge", "psp", "psp+ogm-ge"]
    cfg = read_json(out / "runs" / "psp+ogm-ge" / "seed-0" / "config.json")
    assert (cfg["model"], cfg["task"], cfg["frames"]) == ("psp", "localisation", 4)    # one frame per segment
    md = (out / "report.md").read_text()
    assert "| 76.9 |" in _against(md, "psp+ogm-ge") and "segment accuracy" in md
