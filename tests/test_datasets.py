"""Dataset adapters (SPEC §2): exact discovery on placeholder trees (no media is opened)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from avprep import datasets
from avprep.config import spec_preset
from avprep.datasets import (
    _base,
    ave,
    cremad,
    folder,
    kinetics_sounds,
    splitfiles,
    vggsound,
)
from avprep.datasets._base import Clip, Problem, derive_val, hash_split
from avprep.errors import ConfigError, DatasetLayoutError

REF = Path(__file__).resolve().parents[1].parent / "shared" / "reference-splits"
KS = kinetics_sounds.CLASSES


def touch(root: Path, *rels: str) -> None:
    for r in rels:
        p = root / r
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")


def by_key(disc) -> dict[str, Clip]:
    return {c.key: c for c in disc.clips}


def ref(name: str) -> Path:
    if not (REF / name).is_file():
        pytest.skip(f"reference split file {REF / name} not available")
    return REF / name


# ----------------------------------------------------------------------------- registry, hashing

def test_registry_and_interface():
    assert list(datasets.ADAPTERS) == ["cremad", "kinetics-sounds", "vggsound", "ave", "folder"]
    for name, adapter in datasets.ADAPTERS.items():
        assert adapter.name == name and isinstance(adapter.layout, str) and adapter.layout
        assert adapter.default_duration == (3.0 if name == "cremad" else 10.0)
        assert spec_preset("paper", name).duration == adapter.default_duration   # feeds the presets
        assert callable(adapter.discover) and callable(adapter.synth.plan)
    assert cremad.ADAPTER.num_classes == 6 and kinetics_sounds.ADAPTER.num_classes == 31
    assert vggsound.ADAPTER.num_classes is ave.ADAPTER.num_classes is folder.ADAPTER.num_classes is None
    assert cremad.CLASSES == ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
    assert KS[0] == "blowing_nose" and KS[-1] == "tickling" and KS == sorted(KS)
    assert datasets.get("kinetics_sounds") is kinetics_sounds.ADAPTER and datasets.get("CREMAD") is cremad.ADAPTER
    with pytest.raises(ConfigError, match="cremad, kinetics-sounds, vggsound, ave, folder"):
        datasets.get("ucf101")


def test_hash_split_proportions_determinism_and_stability():
    names = [f"clip{i:05d}" for i in range(2000)]
    splits = {n: hash_split(n, 0) for n in names}
    share = {s: sum(v == s for v in splits.values()) / len(names) for s in ("train", "val", "test")}
    assert abs(share["test"] - 0.10) < 0.025
    assert abs(share["val"] - 0.09) < 0.025
    assert abs(share["train"] - 0.81) < 0.03
    assert {n: hash_split(n, 0) for n in names} == splits          # deterministic
    assert sum(hash_split(n, 1) != splits[n] for n in names) > 200  # the seed matters
    # adding clips never moves existing ones: the split is a function of the name alone
    clips = [Clip(n, "a", "train", Path(n)) for n in names]
    derived = {c.key: c.split for c in derive_val(clips, 0)}
    more = derive_val(clips + [Clip(f"new{i}", "a", "train", Path("x")) for i in range(500)], 0)
    assert {c.key: c.split for c in more if c.key in derived} == derived
    assert abs(sum(v == "val" for v in derived.values()) / 2000 - 0.10) < 0.025


# ----------------------------------------------------------------------------- CREMA-D

CREMA = ["1001_DFA_ANG_XX", "1001_IEO_HAP_HI", "1002_TIE_NEU_XX", "1003_ITS_SAD_XX", "1091_WSI_FEA_XX"]


def test_cremad_clips_audio_labels_and_hash_split(tmp_path):
    touch(tmp_path, *(f"VideoFlash/{n}.flv" for n in CREMA + ["1004_DFA_XYZ_XX"]),
          *(f"AudioWAV/{n}.wav" for n in CREMA[:3]), "VideoFlash/readme.txt", "VideoFlash/.DS_Store")
    disc = cremad.discover(tmp_path)
    assert disc.name == "cremad" and disc.classes == cremad.CLASSES and disc.default_duration == 3.0
    assert [c.key for c in disc.clips] == sorted(CREMA)
    for c in disc.clips:
        assert c.label == c.key.split("_")[2]
        assert c.split == hash_split(c.key, 0)
        assert c.video == tmp_path / "VideoFlash" / f"{c.key}.flv"
        assert c.audio == (tmp_path / "AudioWAV" / f"{c.key}.wav" if c.key in CREMA[:3] else None)
        assert c.meta == {"speaker": c.key[:4]}
    assert disc.problems == [Problem("1004_DFA_XYZ_XX", "VideoFlash/1004_DFA_XYZ_XX.flv", "label",
                                     disc.problems[0].error)]
    assert "XYZ" in disc.problems[0].error
    assert cremad.discover(tmp_path) == disc
    seeded = cremad.discover(tmp_path, seed=7)
    assert [c.split for c in seeded.clips] == [hash_split(n, 7) for n in sorted(CREMA)]


def test_cremad_speaker_split_is_actor_disjoint(tmp_path):
    names = [f"{1001 + a}_{s}_{e}_XX" for a in range(60) for s in ("DFA", "TIE") for e in cremad.CLASSES]
    touch(tmp_path, *(f"VideoFlash/{n}.flv" for n in names))
    disc = cremad.discover(tmp_path, split_by="speaker", seed=3)
    actors = {}
    for c in disc.clips:
        actors.setdefault(c.split, set()).add(c.meta["speaker"])
        assert c.split == hash_split(c.meta["speaker"], 3)
    assert set(actors) == {"train", "val", "test"}
    assert not (actors["train"] & actors["val"]) and not (actors["train"] & actors["test"])
    assert not (actors["val"] & actors["test"])
    # the clip split does leak speakers
    leaky = cremad.discover(tmp_path, seed=3)
    train = {c.meta["speaker"] for c in leaky.clips if c.split == "train"}
    assert train & {c.meta["speaker"] for c in leaky.clips if c.split == "test"}


def test_cremad_layout_and_option_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match="VideoFlash"):
        cremad.discover(tmp_path)
    touch(tmp_path, "VideoFlash/1001_DFA_ANG_XX.flv")
    with pytest.raises(ConfigError, match="split-by"):
        cremad.discover(tmp_path, split_by="sentence")


def test_cremad_ogmge_csvs(tmp_path):
    train_csv, test_csv = ref("cremad_ogmge_train.csv"), ref("cremad_ogmge_test.csv")
    source = splitfiles.read_split_files([train_csv, test_csv], cremad.CLASSES)
    counts = {s: sum(e.split == s for e in source.entries) for s in ("train", "test")}
    assert counts == {"train": 6698, "test": 744} and source.splits == {"train", "test"}
    train_rows = [ln.strip().split(",") for ln in train_csv.read_text().splitlines()[:40]]
    test_rows = [ln.strip().split(",") for ln in test_csv.read_text().splitlines()[:10]]
    listed = dict(train_rows + test_rows)
    touch(tmp_path, *(f"VideoFlash/{n}.flv" for n in listed), "VideoFlash/1099_ZZZ_ANG_XX.flv")
    disc = cremad.discover(tmp_path, split_files=[("train", train_csv), ("test", test_csv)])
    got = by_key(disc)
    assert set(got) == set(listed)
    assert all(got[n].label == emo for n, emo in listed.items())
    assert all(got[n].split == "test" for n, _ in test_rows)
    # val is derived from the published train list by hash of the clip name
    assert all(got[n].split == ("val" if _base.hash_fraction("val:" + n, 0) < 0.1 else "train")
               for n, _ in train_rows)
    assert disc.skipped == {"not in split files": 1}
    missing = [p for p in disc.problems if p.stage == "missing"]
    assert len(missing) == len(disc.problems) == 7442 - 50
    assert any("validation split" in n for n in disc.notes)
    # file names announce the split; a mislabelled row is a label problem, not a clip
    bad = tmp_path / "my_test.csv"
    bad.write_text(f"{test_rows[0][0]},HAP\r\n" if test_rows[0][1] != "HAP" else f"{test_rows[0][0]},SAD\r\n")
    disc = cremad.discover(tmp_path, split_files=[train_csv, bad])
    assert test_rows[0][0] not in by_key(disc)
    assert [p.stage for p in disc.problems if p.key == test_rows[0][0]] == ["label"]


def test_split_file_names_and_formats(tmp_path):
    assert splitfiles.infer_split(Path("cremad_ogmge_train.csv")) == "train"
    assert splitfiles.infer_split(Path("KS_Valid.txt")) == "val"
    assert splitfiles.infer_split(Path("testSet.txt")) == "test"
    assert splitfiles.infer_split(Path("train_val_test.json")) is None
    assert splitfiles.normalize(["validation=/a/b.txt", ("testing", "c.txt")]) == [
        ("val", Path("/a/b.txt")), ("test", Path("c.txt"))]
    assert splitfiles.normalize("ks_test.txt") == [(None, Path("ks_test.txt"))]
    assert splitfiles.parse_clip_id("--4-0ihtnBU_000058_000068") == ("--4-0ihtnBU", 58, 68)
    assert splitfiles.parse_clip_id("--RVKBMp_2M_79") == ("--RVKBMp_2M", 79, None)
    assert splitfiles.parse_clip_id("-3Mwkq-7TV4") == ("-3Mwkq-7TV4", None, None)
    assert splitfiles.parse_clip_id("short_1") is None
    f = tmp_path / "list.csv"
    f.write_text("a,NEU\n")
    with pytest.raises(ConfigError, match="list.csv"):
        splitfiles.read_split_files([f], cremad.CLASSES)
    f = tmp_path / "x_train.txt"
    f.write_text("a,NEU\nb;HAP\n")
    with pytest.raises(DatasetLayoutError, match="x_train.txt:2"):
        splitfiles.read_split_files([f], cremad.CLASSES)
    with pytest.raises(ConfigError, match="unknown split"):
        splitfiles.normalize([("holdout", f)])


# ----------------------------------------------------------------------------- Kinetics-Sounds

def test_kinetics_sounds_tree(tmp_path):
    touch(tmp_path,
          "train/playing bass guitar/aaaaaaaaaaa_000010_000020.mp4",
          "train/bowling/bbbbbbbbbbb_000000_000010.mp4",
          "train/bowling/notes.txt", "train/bowling/.hidden.mp4",
          "train/abseiling/ccccccccccc_000005_000015.mp4",
          "validation/tickling/ddddddddddd_000001_000011.mp4",
          "test/bowling/eeeeeeeeeee_000030_000040.mkv",
          "test/singing/bbbbbbbbbbb_000000_000010.mp4")      # same clip as in train
    disc = kinetics_sounds.discover(tmp_path)
    assert disc.classes == KS and disc.default_duration == 10.0
    assert [(c.key, c.label, c.split) for c in disc.clips] == [
        ("aaaaaaaaaaa_000010_000020", "playing_bass_guitar", "train"),
        ("bbbbbbbbbbb_000000_000010", "bowling", "train"),
        ("ddddddddddd_000001_000011", "tickling", "val"),
        ("eeeeeeeeeee_000030_000040", "bowling", "test")]
    assert disc.clips[0].video == tmp_path / "train/playing bass guitar/aaaaaaaaaaa_000010_000020.mp4"
    assert disc.skipped == {"class not in Kinetics-Sounds": 1, "not a media file": 1}
    assert [(p.key, p.source, p.stage) for p in disc.problems] == [
        ("bbbbbbbbbbb_000000_000010", "test/singing/bbbbbbbbbbb_000000_000010.mp4", "duplicate")]
    assert disc.notes == []


def test_kinetics_sounds_without_val_or_split_folders(tmp_path):
    names = [f"{i:011d}_000000_000010.mp4" for i in range(300)]
    touch(tmp_path / "a", *(f"train/bowling/{n}" for n in names), "test/bowling/zzzzzzzzzzz_000000_000010.mp4")
    disc = kinetics_sounds.discover(tmp_path / "a")
    val = {c.key for c in disc.clips if c.split == "val"}
    assert val == {n[:-4] for n in names if _base.hash_fraction("val:" + n[:-4], 0) < 0.1} and 10 < len(val) < 60
    assert any("validation split" in n for n in disc.notes)
    touch(tmp_path / "b", *(f"bowling/{n}" for n in names))
    flat = kinetics_sounds.discover(tmp_path / "b")
    assert [c.split for c in flat.clips] == [hash_split(n[:-4], 0) for n in sorted(names)]
    with pytest.raises(DatasetLayoutError, match="no class folders"):
        kinetics_sounds.discover(tmp_path / "b" / "bowling")


def _ks_lines(path: Path, n: int) -> list[tuple[str, str]]:
    rows = [ln.split(",") for ln in path.read_text().splitlines()[:n]]
    return [(r[0], KS[int(r[2])]) for r in rows]


def test_kinetics_sounds_ogmge_lists(tmp_path):
    train_txt, test_txt = ref("ks_ogmge_train.txt"), ref("ks_ogmge_test.txt")
    source = splitfiles.read_split_files([train_txt, test_txt], KS)
    assert sum(e.split == "train" for e in source.entries) == 14799
    assert sum(e.split == "test" for e in source.entries) == 2597
    train, test = _ks_lines(train_txt, 20), _ks_lines(test_txt, 6)
    files = {}
    for clip, label in train[:-1]:
        files[clip] = f"train/{label.replace('_', ' ')}/{clip}.mp4"
    wrong_clip, wrong_label = train[-1]
    other = KS[(KS.index(wrong_label) + 1) % 31]
    files[wrong_clip] = f"train/{other}/{wrong_clip}.mp4"
    # test ids are <youtube_id>_<start>: files named by start/end; the split folder does not matter
    for clip, label in test[:4]:
        yt, start, _ = splitfiles.parse_clip_id(clip)
        files[clip] = f"val/{label}/{yt}_{start:06d}_{start + 10:06d}.mp4"
    yt5, start5, _ = splitfiles.parse_clip_id(test[4][0])   # only file of that video, other start
    files[test[4][0]] = f"test/{test[4][1]}/{yt5}_{start5 + 3:06d}_{start5 + 13:06d}.mp4"
    touch(tmp_path, *files.values(), "train/bowling/unlisted_000000_000010.mp4",
          "train/abseiling/unlisted2_000000_000010.mp4")
    disc = kinetics_sounds.discover(tmp_path, split_files=[train_txt, test_txt])
    got = by_key(disc)
    expected = {Path(files[c]).stem: (label, "test") for c, label in test[:5]}
    expected.update({c: (label, "val" if _base.hash_fraction("val:" + c, 0) < 0.1 else "train")
                     for c, label in train[:-1]})
    assert {k: (c.label, c.split) for k, c in got.items()} == expected
    assert got[Path(files[test[0][0]]).stem].meta == {"listed_as": test[0][0]}
    assert [(p.key, p.stage) for p in disc.problems if p.stage != "missing"] == [(wrong_clip, "label")]
    assert sum(p.stage == "missing" for p in disc.problems) == 14799 + 2597 - 20 - 5
    assert test[5][0] in {p.key for p in disc.problems if p.stage == "missing"}
    assert disc.skipped == {"class not in Kinetics-Sounds": 1, "not in split files": 1}


def test_kinetics_sounds_tpami_json(tmp_path):
    path = ref("ks_train_val_test.json")
    db = json.loads(path.read_text())["database"]
    source = splitfiles.read_split_files([path], KS)
    assert {s: sum(e.split == s for e in source.entries) for s in ("train", "val", "test")} == {
        "train": 14799, "val": 1320, "test": 2597}
    subset = {}
    for want in ("training", "validation", "testing"):
        subset.update(dict([(k, v) for k, v in db.items() if v["subset"] == want][:5]))
    files = {}
    for clip, info in subset.items():
        yt, start, end = splitfiles.parse_clip_id(clip)
        end = start + 10 if end is None else end
        files[clip] = f"train/{info['label']}/{yt}_{start:06d}_{end:06d}.mp4"
    touch(tmp_path, *files.values())
    disc = kinetics_sounds.discover(tmp_path, split_files=[path])
    split = {"training": "train", "validation": "val", "testing": "test"}
    assert {c.key: (c.label, c.split) for c in disc.clips} == {
        Path(files[k]).stem: (v["label"], split[v["subset"]]) for k, v in subset.items()}
    assert {p.stage for p in disc.problems} == {"missing"} and len(disc.problems) == 18716 - 15
    assert not any("validation split" in n for n in disc.notes)
    only_val = kinetics_sounds.discover(tmp_path, split_files=[("val", path)])
    assert {c.split for c in only_val.clips} == {"val"} and len(only_val.clips) == 5


# ----------------------------------------------------------------------------- VGGSound

def test_vggsound(tmp_path, monkeypatch):
    (tmp_path / "vggsound.csv").write_text(
        'aaaaaaaaaaa,30,"male speech, man speaking",train\r\n'
        "bbbbbbbbbbb,0,dog barking,test\r\n"
        "ccccccccccc,7,dog barking,train\r\n"
        "ddddddddddd,12,helicopter,test\r\n"          # no video
        "bbbbbbbbbbb,0,dog barking,test\r\n")         # listed twice
    touch(tmp_path, "video/a/aaaaaaaaaaa_000030.mp4", "video/bbbbbbbbbbb_0.mp4",
          "deep/er/ccccccccccc_000007_000017.mkv", "video/ccccccccccc_000008.mp4", "video/x.txt")
    walks = []
    real_walk = os.walk
    monkeypatch.setattr(vggsound.os, "walk", lambda *a, **k: walks.append(a) or real_walk(*a, **k))
    disc = vggsound.discover(tmp_path)
    assert len(walks) == 1
    assert disc.classes == ["dog barking", "helicopter", "male speech, man speaking"]
    val = lambda k: "val" if _base.hash_fraction("val:" + k, 0) < 0.1 else "train"   # noqa: E731
    assert [(c.key, c.label, c.split, c.video.relative_to(tmp_path).as_posix()) for c in disc.clips] == [
        ("aaaaaaaaaaa_000030", "male speech, man speaking", val("aaaaaaaaaaa_000030"),
         "video/a/aaaaaaaaaaa_000030.mp4"),
        ("bbbbbbbbbbb_000000", "dog barking", "test", "video/bbbbbbbbbbb_0.mp4"),
        ("ccccccccccc_000007", "dog barking", val("ccccccccccc_000007"), "deep/er/ccccccccccc_000007_000017.mkv")]
    assert disc.clips[0].meta == {"youtube_id": "aaaaaaaaaaa", "start": 30}
    assert [(p.key, p.source, p.stage) for p in disc.problems] == [
        ("bbbbbbbbbbb_000000", "video/bbbbbbbbbbb_0.mp4", "duplicate"),
        ("ddddddddddd_000012", "vggsound.csv:4", "missing")]
    assert any("validation split" in n for n in disc.notes)


def test_vggsound_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match="vggsound.csv"):
        vggsound.discover(tmp_path)
    (tmp_path / "vggsound.csv").write_text("# YouTube ID,start seconds,label,split\naaaaaaaaaaa,x,dog,train\n")
    with pytest.raises(DatasetLayoutError, match="vggsound.csv:2"):
        vggsound.discover(tmp_path)
    with pytest.raises(ConfigError):
        vggsound.discover(tmp_path, split_by="speaker")


# ----------------------------------------------------------------------------- AVE

ANNOTATIONS = ("Category&VideoID&Quality&StartTime&EndTime\r\n"
               "Church bell&RUhOCu3LNXM&good&0&10\r\n"
               "Male speech, man speaking&aaaaaaaaaaa&good&2&7  \r\n"
               "Bark&bbbbbbbbbbb&good&1&4\r\n"
               "Bark&ccccccccccc&bad&3&9\r\n"
               "Bark&ddddddddddd&good&0&5\r\n")


def test_ave_with_split_files(tmp_path):
    (tmp_path / "Annotations.txt").write_text(ANNOTATIONS)
    (tmp_path / "trainSet.txt").write_text("Church bell&RUhOCu3LNXM&good&0&10 \r\n"
                                           "Bark&bbbbbbbbbbb&good&1&4\n\n"
                                           "Church bell&ddddddddddd&good&0&5\n")
    (tmp_path / "testSet.txt").write_text("Category&VideoID&Quality&StartTime&EndTime\n"
                                          "Male speech, man speaking&aaaaaaaaaaa&good&2&7\n"
                                          "Bark&eeeeeeeeeee&good&0&1\n")
    touch(tmp_path, *(f"AVE/{v}.mp4" for v in ("RUhOCu3LNXM", "aaaaaaaaaaa", "bbbbbbbbbbb", "ccccccccccc",
                                               "ddddddddddd")))
    disc = ave.discover(tmp_path)
    assert disc.classes == ["Bark", "Church bell", "Male speech, man speaking"]
    val = lambda k: "val" if _base.hash_fraction("val:" + k, 0) < 0.1 else "train"   # noqa: E731
    assert [(c.key, c.label, c.split, c.meta) for c in disc.clips] == [
        ("RUhOCu3LNXM", "Church bell", val("RUhOCu3LNXM"), {"event": [0.0, 10.0], "quality": "good"}),
        ("aaaaaaaaaaa", "Male speech, man speaking", "test", {"event": [2.0, 7.0], "quality": "good"}),
        ("bbbbbbbbbbb", "Bark", val("bbbbbbbbbbb"), {"event": [1.0, 4.0], "quality": "good"})]
    assert disc.clips[0].video == tmp_path / "AVE" / "RUhOCu3LNXM.mp4"
    assert [(p.key, p.source, p.stage) for p in disc.problems] == [
        ("ddddddddddd", "trainSet.txt:4", "label"),
        ("eeeeeeeeeee", "AVE/eeeeeeeeeee.mp4", "missing")]
    assert disc.skipped == {"not in split files": 1}      # ccccccccccc
    assert any("validation split" in n for n in disc.notes)


def test_ave_without_split_files_and_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match="Annotations.txt"):
        ave.discover(tmp_path)
    (tmp_path / "Annotations.txt").write_text(ANNOTATIONS.replace("\r\n", "\n").split("\n", 1)[1])  # no header
    with pytest.raises(DatasetLayoutError, match="AVE"):
        ave.discover(tmp_path)
    touch(tmp_path, "AVE/aaaaaaaaaaa.mp4", "AVE/bbbbbbbbbbb.mp4")
    disc = ave.discover(tmp_path)
    assert [(c.key, c.split) for c in disc.clips] == [(k, hash_split(k, 0)) for k in ("aaaaaaaaaaa", "bbbbbbbbbbb")]
    assert sorted(p.key for p in disc.problems if p.stage == "missing") == ["RUhOCu3LNXM", "ccccccccccc",
                                                                         "ddddddddddd"]
    (tmp_path / "Annotations.txt").write_text(ANNOTATIONS + "Bark&fff&good&x&1\n")
    with pytest.raises(DatasetLayoutError, match="Annotations.txt:7"):
        ave.discover(tmp_path)


# ----------------------------------------------------------------------------- folder

def test_folder_flat_with_odd_names(tmp_path):
    touch(tmp_path, "cats/my clip.mp4", "cats/日本.mkv", "cats/中国.webm", "cats/info.json",
          "cats/.hidden.mp4", "dogs/my clip.avi", "dogs/sub/x.mov", "dogs/README.txt", "stray.mp4",
          "dogs/x.mov")
    disc = folder.discover(tmp_path)
    assert disc.classes == ["cats", "dogs"]
    keys = by_key(disc)
    assert len(keys) == 5 and all("." not in k and " " not in k and k.isascii() for k in keys)
    sources = {c.video.relative_to(tmp_path).as_posix(): c for c in disc.clips}
    assert set(sources) == {"cats/my clip.mp4", "cats/日本.mkv", "cats/中国.webm", "dogs/my clip.avi", "dogs/x.mov"}
    a, b = sources["cats/my clip.mp4"].key, sources["dogs/my clip.avi"].key
    assert a != b and a.startswith("my_clip_") and b.startswith("my_clip_")
    assert sources["cats/日本.mkv"].key != sources["cats/中国.webm"].key
    assert all(c.split == hash_split(f"{c.label}/{c.video.name}", 0) for c in disc.clips)
    # dogs/x.mov and dogs/sub/x.mov: one clip twice
    assert [(p.key, p.source, p.stage) for p in disc.problems] == [("x", "dogs/sub/x.mov", "duplicate")]
    assert disc.skipped == {"file outside a class folder": 1, "not a media file": 2}
    assert folder.discover(tmp_path) == disc


def test_folder_split_layout(tmp_path):
    touch(tmp_path, "train/a/1.mp4", "train/b/2.mp4", "valid/a/3.mp4", "test/b/4.mp4", "test/a/1.mp4")
    disc = folder.discover(tmp_path)
    assert [(c.key, c.label, c.split) for c in disc.clips] == [
        ("1", "a", "train"), ("2", "b", "train"), ("3", "a", "val"), ("4", "b", "test")]
    assert [(p.key, p.source, p.stage) for p in disc.problems] == [("1", "test/a/1.mp4", "duplicate")]
    touch(tmp_path, "extra/c/5.mp4")
    with pytest.raises(DatasetLayoutError, match="mixes split folders"):
        folder.discover(tmp_path)
