"""Shared media fixtures: real encoded clips and raw datasets written by avprep.synth.

- ``make_clip(name="clip.mp4", **write_clip_kwargs) -> Path``: one clip in the test's tmp folder
  (defaults: 3 s, 10 fps, 96x72, class 0 of 4).
- ``raw_dataset(name, clips=8, **make_dataset_kwargs) -> Path``: a raw dataset in its real
  layout, built once per session for the same arguments. Durations default to 2 s (CREMA-D)
  and 3 s (others) to stay fast; pass ``duration=None`` for the real lengths. Treat it as read-only; copy it
  (``shutil.copytree``) before changing anything.
- ``tiny_clip``: a 2 s 64x48 MP4 with audio, shared by the session (read-only).
"""
from __future__ import annotations

import json

import pytest

from avprep import synth


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
