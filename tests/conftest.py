"""Shared media fixtures: real encoded clips and raw datasets written by avprep.synth.

- ``make_clip(name="clip.mp4", **write_clip_kwargs) -> Path``: one clip in the test's tmp folder
  (defaults: 3 s, 10 fps, 96x72, class 0 of 4).
- ``raw_dataset(name, clips=8, **make_dataset_kwargs) -> Path``: a raw dataset in its real
  layout, built once per session for the same arguments. Durations default to 2 s (CREMA-D)
  and 3 s (others) to stay fast; pass ``duration=None`` for the real lengths. Treat it as read-only; copy it
  (``shutil.copytree``) before changing anything.
- ``tiny_clip``: a 2 s 64x48 MP4 with audio, shared by the session (read-only).
- ``train_shards(clips=64, seed=0, shard_size=8) -> Path``: real shards of a synthetic CREMA-D
  (1 s clips, 129x124 spectrograms, 32-px frames) for training tests, built once per session
  for the same arguments (read-only).
- ``one_torch_thread``: one intra-op torch thread for the test (use
  ``pytestmark = pytest.mark.usefixtures("one_torch_thread")`` for a whole module).
- Servers (tests/_servers.py): ``s3_server`` (moto on 127.0.0.1), ``http_server`` (Range
  support), ``aws_env``; request them by name. Helpers such as ``MotoS3``, ``FlakyProxy`` and
  ``write_shard_folder`` are imported from ``tests._servers``.
"""
from __future__ import annotations

import json

import pytest

from avprep import synth
from tests._servers import aws_env, http_server, s3_server  # noqa: F401  (fixtures for every module)


@pytest.fixture
def make_clip(tmp_path):
    def make(name: str = "clip.mp4", **kwargs):
        kwargs.setdefault("duration", 3.0)
        kwargs.setdefault("label_index", 0)
        kwargs.setdefault("num_classes", 4)
        kwargs.setdefault("fps", 10)
        kwargs.setdefault("size", (96, 72))
        return synth.write_clip(tmp_path / name, **kwargs)

    return make


@pytest.fixture(scope="session")
def raw_dataset(tmp_path_factory):
    cache = {}

    def make(name: str, clips: int = 8, **kwargs):
        kwargs.setdefault("duration", 2.0 if name == "cremad" else 3.0)
        key = (name, clips, json.dumps(kwargs, sort_keys=True, default=str))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"raw-{name}")
            cache[key] = synth.make_dataset(name, out, clips, **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.mp4"
    return synth.write_clip(path, duration=2.0, label_index=1, num_classes=4, fps=10, size=(64, 48))


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: OpenMP threads only spin against each other on a shared machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory):
    from avprep.config import ExtractConfig, spec_preset
    from avprep.extract import extract

    cache = {}

    def make(clips: int = 64, seed: int = 0, shard_size: int = 8):
        key = (clips, seed, shard_size)
        if key not in cache:
            root = tmp_path_factory.mktemp("train-shards")
            raw = synth.make_dataset("cremad", root / "raw", clips, seed=seed, duration=1.0, size=(64, 48), fps=4)
            spec = spec_preset("paper", "cremad", duration=1.0, n_fft=256, win_length=256, hop_length=128)
            cfg = ExtractConfig(spec=spec, frame_size=32, shard_size=shard_size)
            extract("cremad", raw, root / "shards", cfg, workers=1)
            cache[key] = root / "shards"
        return cache[key]

    return make


@pytest.fixture(scope="session")
def ave_shards(tmp_path_factory):
    """Tiny synthetic AVE shards with segment labels: 40 clips of 4 s (four 1 s segments, events
    inside the clip), 4 classes, 32-pixel frames at 1 fps, 129-bin spectrograms, 8 per shard."""
    from avprep.config import ExtractConfig, spec_preset
    from avprep.extract import extract

    root = tmp_path_factory.mktemp("ave-shards")
    raw = synth.make_dataset("ave", root / "raw", 40, seed=0, duration=4.0, size=(64, 48), fps=4, num_classes=4)
    spec = spec_preset("paper", "ave", duration=4.0, n_fft=256, win_length=256, hop_length=128)
    extract("ave", raw, root / "shards", ExtractConfig(spec=spec, frame_size=32, shard_size=8), workers=1)
    return root / "shards"
