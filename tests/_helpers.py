"""Plain helpers shared by several test modules (test modules never import each other).

- ``KS_CLASSES``, ``small_config``, ``write_ks_clip``: a tiny real Kinetics-Sounds extraction
  (test_verify, test_hostile).
- ``read_tar``: a tar's (name, bytes) members in order.
- ``read_jsonl``: the objects of a .jsonl file.
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

from avprep import synth
from avprep.config import ExtractConfig, spec_preset

KS_CLASSES = ("blowing_nose", "bowling")


def small_config(**kw) -> ExtractConfig:
    """Tiny but real: 2 s of audio (spec 257x199), 64-px frames."""
    return ExtractConfig(spec=spec_preset("paper", "kinetics-sounds", duration=2.0),
                         frame_size=64, **{"shard_size": 2, **kw})


def write_ks_clip(raw: Path, split: str, label: str, n: int, **kw) -> Path:
    """One real clip in the Kinetics-Sounds layout (``raw/<split>/<class>/<id>_<s>_<e>.mp4``)."""
    path = raw / split / label / f"clip{n:07d}_{n:06d}_{n + 10:06d}.mp4"
    kw = {"duration": 2.0, "fps": 5, "size": (80, 60), "seed": n, **kw}
    return synth.write_clip(path, label_index=KS_CLASSES.index(label) if label in KS_CLASSES else 0,
                            num_classes=len(KS_CLASSES), **kw)


def read_tar(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]


def read_jsonl(path) -> list:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


WALL_TIME = {"time_s", "samples_per_s"}      # metrics.jsonl keys that differ between identical runs


def strip_wall_time(rows) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in WALL_TIME} for r in rows]


REPO = Path(__file__).resolve().parents[1]


def torchrun() -> list[str]:
    """The torchrun of this interpreter's environment."""
    import sys

    exe = Path(sys.executable).parent / "torchrun"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def raw_header(name: str, size_field: bytes, kind: bytes = b"0") -> bytes:
    """One ustar header with any size field and a valid checksum (what tarfile refuses to write)."""
    h = bytearray(512)
    h[:len(name)], h[100:108], h[124:136], h[156:157] = name.encode(), b"0000644\0", size_field, kind
    h[257:263], h[148:156] = b"ustar\0", b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def publish(out: Path, name: str, http_server, s3_server) -> dict[str, str]:
    """The shard folder ``out`` served locally, over HTTP and from a fresh S3 bucket, as
    ``{"local"|"http"|"s3": location}``."""
    import shutil

    from avprep.upload import upload_folder

    shutil.copytree(out, http_server.root / name, dirs_exist_ok=True)
    bucket = s3_server.new_bucket()
    upload_folder(out, f"s3://{bucket}/{name}", s3_endpoint=s3_server.endpoint)
    return {"local": str(out), "http": f"{http_server.url}/{name}", "s3": f"s3://{bucket}/{name}"}


def npy_bytes(arr) -> bytes:
    """``arr`` as a ``.npy`` file."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def grey_jpeg(value: int, wh=(20, 12)) -> bytes:
    """A flat grey JPEG of ``value`` (so a test can tell frames apart)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", wh, (value,) * 3).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def tar_bytes(members: list[tuple[str, bytes]], fmt=tarfile.PAX_FORMAT) -> bytes:
    """A tar holding exactly ``members`` (name, bytes), in that order."""
    import io

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sample_members(key: str, n_frames: int = 3, label: int = 1) -> list[tuple[str, bytes]]:
    """The members of one small sample: label, json, a 3x4 float16 spectrogram, grey frames."""
    import numpy as np

    spec = np.arange(12, dtype=np.float16).reshape(3, 4)
    return ([(f"{key}.cls", str(label).encode()), (f"{key}.json", b'{"k": 1}'), (f"{key}.spec.npy", npy_bytes(spec))]
            + [(f"{key}.f{j:03d}.jpg", grey_jpeg(20 * j + 10)) for j in range(n_frames)])


def av_batch(batch: int, classes: int, seed: int = 0):
    """(audio, visual, labels) of random inputs shaped for the small test models: spectrograms
    (B, 1, 32, 48), three 32x32 frames (B, 1, 3, 32, 32), labels in [0, classes)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 1, 32, 48, generator=g), torch.randn(batch, 1, 3, 32, 32, generator=g),
            torch.randint(0, classes, (batch,), generator=g))
