"""`avprep extract | datasets | info | upload`: exit codes, summaries, resume, s3 output."""
from __future__ import annotations

import json
import shutil

import click
import numpy as np
import pytest
from click.testing import CliRunner

from cli.avprep_cli import main

FAST = ["--frame-size", "32", "--shard-size", "4", "--workers", "1"]


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def raw(raw_dataset):
    return raw_dataset("cremad", clips=8, seed=5)


@pytest.fixture(scope="module")
def extracted(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "out"
    code, output = run("extract", "--dataset", "cremad", "--src", raw, "--out", out, *FAST)
    assert code == 0, output
    return out, output


def test_extract_prints_summary_and_info_reads_it(extracted):
    out, output = extracted
    assert "samples per class" in output and "8 samples in" in output
    dataset = json.loads((out / "dataset.json").read_text())
    assert sum(dataset["splits"].values()) == 8 and dataset["config"]["frame_size"] == 32
    code, text = run("info", out, "--json")
    assert code == 0
    info = json.loads(text)
    assert info["dataset"] == dataset
    assert set(info["manifests"]) == set(dataset["splits"])
    assert info["manifests"]["train"] == json.loads((out / "train.manifest.json").read_text())
    code, text = run("info", out)
    assert code == 0 and "paper" in text and "257×299" in text and "NEU" in text


def test_rerun_resumes_everything_and_keeps_bytes(raw, extracted, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(extracted[0], out)
    code, output = run("extract", "--dataset", "cremad", "--src", raw, "--out", out, *FAST)
    assert code == 0 and "resumed" in output
    # nothing was extracted again: no clips/s rate made of resumed clips
    assert "nothing extracted, 8 clips resumed" in output and "clips/s" not in output
    assert _files(out) == _files(extracted[0])


@pytest.fixture(scope="module")
def bad_raw(raw, tmp_path_factory):
    src = tmp_path_factory.mktemp("bad") / "cremad"
    shutil.copytree(raw, src)
    (src / "VideoFlash" / "1001_DFA_ANG_XX.flv").write_bytes(b"")
    (src / "VideoFlash" / "1001_DFA_HAP_XX.mp4").write_bytes(np.random.default_rng(1).bytes(3000))
    return src


def test_failures_above_threshold_exit_1_else_0(bad_raw, tmp_path):
    args = ["extract", "--dataset", "cremad", "--src", bad_raw, "--out", tmp_path, *FAST]
    code, output = run(*args)
    assert code == 1, output
    assert "failures by stage" in output and "failures.jsonl" in output and "1001_DFA_HAP_XX" in output
    assert len((tmp_path / "failures.jsonl").read_text().splitlines()) == 2
    # 2 of 10 failed: fine under a 25% threshold (a resumed run: nothing is decoded again)
    code, output = run(*args, "--max-failures", "0.25")
    assert code == 0, output


def test_usage_and_config_errors_exit_2(raw, extracted, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(extracted[0], out)
    code, output = run("extract", "--dataset", "cremad", "--src", raw, "--out", out, *FAST, "--jpeg-quality", "80")
    assert code == 2 and "other options" in output and "--overwrite" in output
    assert _files(out) == _files(extracted[0])
    for args, message in [
        (["--dataset", "nope"], "'nope' is not one of 'cremad', 'kinetics-sounds', 'vggsound', 'ave', 'folder'"),
        (["--dataset", "cremad", "--spec", "mel"], "Invalid value"),
        (["--dataset", "cremad", "--split-by", "colour"], "split-by"),
        (["--dataset", "cremad", "--hop-length", "0"], "invalid STFT"),
        (["--dataset", "kinetics-sounds"], "kinetics"),          # CREMA-D tree is not a KS tree
    ]:
        code, output = run("extract", "--src", raw, "--out", tmp_path / "o", *FAST, *args)
        assert code == 2, (args, output)
        assert message.lower() in output.lower(), (args, output)
        assert not (tmp_path / "o").exists(), "a refused run must leave nothing behind"
    code, output = run("info", tmp_path / "empty-nothing")
    assert code == 2
    for bad in ("[1, 2]", '{"splits": [1]}', "{" * 5000, "not json"):
        (out / "dataset.json").write_text(bad)
        code, output = run("info", out)
        assert code == 2 and output.startswith("error: ") and output.count("\n") == 1, (bad[:20], output)
        assert "dataset.json" in output


def test_unwritable_out_is_one_line_exit_2(raw, tmp_path):
    code, output = run("extract", "--dataset", "cremad", "--src", raw, "--out", "/sys/avprep-test-out", *FAST)
    assert code == 2 and output.startswith("error: ") and "/sys/avprep-test-out" in output, output
    assert output.count("\n") == 1 and "Traceback" not in output


def test_datasets_lists_every_adapter():
    code, text = run("datasets", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(text)}
    assert set(rows) == {"cremad", "kinetics-sounds", "vggsound", "ave", "folder"}
    assert rows["cremad"]["classes"] == 6 and rows["kinetics-sounds"]["classes"] == 31
    assert "VideoFlash" in rows["cremad"]["layout"]
    code, text = run("datasets")
    assert code == 0 and "kinetics-sounds" in text


def test_extract_to_s3_and_upload(raw, extracted, s3_server, tmp_path):
    bucket = s3_server.new_bucket()
    endpoint = ["--s3-endpoint", s3_server.endpoint]
    code, output = run("extract", "--dataset", "cremad", "--src", raw, "--out", f"s3://{bucket}/ds/v1",
                       *FAST, *endpoint, "--staging", tmp_path / "stage")
    assert code == 0, output
    client = s3_server.client()

    def objects(prefix):
        listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]
        return {o["Key"][len(prefix):]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
                for o in listing}

    assert objects("ds/v1/") == _files(extracted[0])          # no resume state uploaded
    code, output = run("upload", extracted[0], f"s3://{bucket}/copy", *endpoint)
    assert code == 0, output
    assert objects("copy/") == _files(extracted[0])


def test_upload_into_a_missing_bucket_says_how_to_create_it(extracted, s3_server, raw, tmp_path):
    """A bucket that is not there: one line naming it and the fix, nothing sent; --create-bucket
    creates it and uploads everything, shards first and dataset.json last."""
    bucket = f"missing-{tmp_path.name[-8:].lower().replace('_', '-')}"
    endpoint = ["--s3-endpoint", s3_server.endpoint]
    code, output = run("upload", extracted[0], f"s3://{bucket}/ds", *endpoint)
    assert code == 2 and output.count("\n") == 1, output
    assert output == (f"error: s3://{bucket}: no such bucket; create it first (aws s3 mb s3://{bucket} "
                      f"--endpoint-url {s3_server.endpoint}) or pass --create-bucket\n")
    code, output = run("extract", "--dataset", "cremad", "--src", raw, "--out", f"s3://{bucket}/x", *FAST, *endpoint,
                       "--staging", tmp_path / "stage")
    assert code == 2 and "no such bucket" in output and "--create-bucket" not in output, output
    assert not (tmp_path / "stage").exists()        # refused before any work
    client = s3_server.client()
    assert bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}
    code, output = run("upload", extracted[0], f"s3://{bucket}/ds", *endpoint, "--create-bucket")
    assert code == 0, output
    listing = client.list_objects_v2(Bucket=bucket, Prefix="ds/")["Contents"]
    assert {o["Key"][3:] for o in listing} == set(_files(extracted[0]))


def test_split_files_decide_splits_and_are_recorded(raw, tmp_path):
    import hashlib

    names = sorted(p.stem for p in (raw / "VideoFlash").iterdir())
    train, test = tmp_path / "my_train.csv", tmp_path / "held_out.csv"
    train.write_text("".join(f"{n},{n.split('_')[2]}\n" for n in names[:6]))
    test.write_text("".join(f"{n},{n.split('_')[2]}\n" for n in names[6:]))
    out = tmp_path / "out"
    code, output = run("extract", "--dataset", "cremad", "--src", raw, "--out", out, *FAST,
                       "--split-file", train, "--split-file", f"test={test}")
    assert code == 0, output
    extra = json.loads((out / "dataset.json").read_text())["config"]["extra"]
    assert extra["split_files"] == [
        {"split": "train", "name": "my_train.csv", "sha256": hashlib.sha256(train.read_bytes()).hexdigest()},
        {"split": "test", "name": "held_out.csv", "sha256": hashlib.sha256(test.read_bytes()).hexdigest()}]
    test_keys = [json.loads(line)["key"] for line in (out / "test.samples.jsonl").read_text().splitlines()]
    assert test_keys == names[6:]
    # the same run with another split file content is refused (exit 2)
    test.write_text(f"{names[7]},{names[7].split('_')[2]}\n")
    code, output = run("extract", "--dataset", "cremad", "--src", raw, "--out", out, *FAST,
                       "--split-file", train, "--split-file", f"test={test}")
    assert code == 2 and "split_files" in output


def test_extract_in_a_log_prints_plain_progress_lines(raw, tmp_path):
    r = CliRunner().invoke(main, ["extract", "--dataset", "cremad", "--src", str(raw), "--out", str(tmp_path / "o"),
                                  *FAST], env={"AVPREP_PROGRESS_INTERVAL": "0"}, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    lines = [line for line in r.output.splitlines() if line.startswith("extract: ")]
    assert lines and lines[-1].startswith("extract: 8/8 clips (100%), ") and "clips/s" in lines[-1], r.output


def test_dataset_is_a_choice_of_the_adapter_registry_everywhere(raw, extracted, tmp_path):
    from avprep.datasets import ADAPTERS

    def commands(group, prefix=""):
        for name, cmd in group.commands.items():
            yield f"{prefix}{name}", cmd
            if isinstance(cmd, click.Group):
                yield from commands(cmd, f"{prefix}{name} ")

    seen = []
    for name, cmd in commands(main):
        for p in cmd.params:
            if p.name == "dataset":      # every --dataset: names of the registry (download: those it can fetch)
                assert isinstance(p.type, click.Choice) and set(p.type.choices) <= set(ADAPTERS), name
                assert name == "download" or list(p.type.choices) == list(ADAPTERS), name
                seen.append(name)
    assert {"extract", "synth", "splits list", "download"} <= set(seen)
    # other spellings of a registered name are still accepted (what datasets.get accepts)
    code, output = run("extract", "--dataset", "CREMAD", "--src", raw, "--out", tmp_path / "o", *FAST)
    assert code == 0, output
    assert _files(tmp_path / "o") == _files(extracted[0])


def test_find_outputs_newest_first_and_reads_only(tmp_path):
    import os

    from avprep import outdir

    def output(path, written, finished=True):
        (path / outdir.STATE_DIR).mkdir(parents=True)
        os.utime(path / outdir.STATE_DIR, (written, written))
        if finished:
            (path / "dataset.json").write_text("{}")
            os.utime(path / "dataset.json", (written + 5, written + 5))

    output(tmp_path / "old", 1_000_000)
    output(tmp_path / "new", 2_000_000)
    output(tmp_path / "running", 1_500_000, finished=False)
    (tmp_path / "raw").mkdir()
    (tmp_path / "deep" / "er").mkdir(parents=True)
    output(tmp_path / "deep" / "er" / "shards", 3_000_000)            # two levels down: not looked at
    listing = sorted(str(p) for p in tmp_path.rglob("*"))
    assert outdir.find_outputs(tmp_path) == [tmp_path / n for n in ("new", "running", "old")]
    assert sorted(str(p) for p in tmp_path.rglob("*")) == listing
    output(tmp_path, 4_000_000)                                         # the folder itself is one
    assert outdir.find_outputs(tmp_path)[0] == tmp_path
    assert outdir.find_outputs(tmp_path / "missing") == []


def test_verify_without_an_argument_checks_the_last_extraction_here(extracted, tmp_path, monkeypatch):
    import os

    from cli.avprep_cli import main as avprep_main

    shutil.copytree(extracted[0], tmp_path / "older")
    shutil.copytree(extracted[0], tmp_path / "newer")
    (tmp_path / "newer" / "train-000000.tar").write_bytes(b"damaged")
    os.utime(tmp_path / "older" / "dataset.json", (1_000_000, 1_000_000))
    os.utime(tmp_path / "older" / ".avprep-state", (1_000_000, 1_000_000))
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(avprep_main, ["verify"], catch_exceptions=False)
    assert r.exit_code == 1 and r.stderr.splitlines()[0] == "verifying newer (the last extraction here)", r.output
    assert "train-000000.tar" in r.stdout
    monkeypatch.chdir(tmp_path / "older")
    r = CliRunner().invoke(avprep_main, ["verify", "--quick"], catch_exceptions=False)
    assert r.exit_code == 0 and r.stderr.splitlines()[0] == "verifying . (the last extraction here)", r.output
