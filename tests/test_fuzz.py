"""Seeded mutation fuzzing of a real extracted shard (issue 15): for every mutant, ``avprep
verify`` and the training loader finish within a time bound, raise only the project's typed
errors, give the same verdict per sample (the loader skips exactly the samples verify rejects),
and the loader never yields a sample verify rejects.

The corpus is generated from a seed: bit flips, random overwrites, truncations, insertions,
duplicated and zeroed blocks, and header edits that keep the header checksum valid (huge octal and
base-256 sizes, pax size/path records, chained pax headers, other member types), so the mutants
reach past the checksum into the size and structure logic. The default suite runs ``N_DEFAULT``
mutants (well under a minute); ``-m slow`` runs ``N_SLOW``.
"""
from __future__ import annotations

import random
import shutil

import pytest

from tests._mutants import assert_agree, verdict

N_DEFAULT = 500
N_SLOW = 5000
TIME_BOUND_S = 30.0       # per mutant, verify + one loader pass; a clean one takes well under 1 s


@pytest.fixture(scope="module")
def clean(raw_dataset, tmp_path_factory):
    from avprep.config import ExtractConfig, spec_preset
    from avprep.extract import extract

    raw = raw_dataset("cremad", clips=10)
    out = tmp_path_factory.mktemp("fuzz") / "out"
    cfg = ExtractConfig(spec=spec_preset("paper", "cremad", duration=0.5), frame_size=24, shard_size=100)
    extract("cremad", raw, out, cfg, workers=1)
    from ogmge_train.data import read_dataset
    info = read_dataset(out)
    split = max(info.splits, key=lambda s: info.splits[s].num_samples)
    return out, split, info.index(split)


def _checksum(h: bytearray) -> bytearray:
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return h


def _pax(records: bytes) -> bytes:
    h = bytearray(512)
    h[:9], h[100:108], h[124:136], h[156:157], h[257:263] = b"PaxHeader", b"0000644\0", b"%011o\0" % len(records), \
        b"x", b"ustar\0"
    return bytes(_checksum(h)) + records.ljust(-(-len(records) // 512) * 512, b"\0")


def mutate(data: bytes, headers: list[int], rng: random.Random) -> tuple[str, bytes]:
    """One mutant of ``data`` (a tar whose member headers start at ``headers``)."""
    b = bytearray(data)
    kind = rng.choice(["flip", "overwrite", "truncate", "insert", "dup-block", "zero-block", "size-octal",
                       "size-base256", "pax-size", "pax-path", "pax-chain", "type", "name"])
    at = rng.randrange(len(b))
    h = rng.choice(headers)
    if kind == "flip":
        b[at] ^= 1 << rng.randrange(8)
    elif kind == "overwrite":
        n = rng.randrange(1, 64)
        b[at:at + n] = rng.randbytes(n)
    elif kind == "truncate":
        del b[at:]
    elif kind == "insert":
        b[at:at] = rng.randbytes(rng.randrange(1, 1024))
    elif kind == "dup-block":
        block = (at // 512) * 512
        b[block:block] = b[block:block + 512]
    elif kind == "zero-block":
        block = (at // 512) * 512
        b[block:block + 512] = bytes(len(b[block:block + 512]))
    elif kind == "size-octal":
        hb = bytearray(b[h:h + 512])
        hb[124:136] = b"%011o\0" % rng.choice([0, 1, 511, 513, 10**6, 8**11 - 1])
        b[h:h + 512] = _checksum(hb)
    elif kind == "size-base256":
        hb = bytearray(b[h:h + 512])
        hb[124:136] = b"\x80" + rng.choice([2**62, 2**40, 2**33, 5]).to_bytes(11, "big")
        b[h:h + 512] = _checksum(hb)
    elif kind == "pax-size":
        size = rng.choice([0, 7, 2**40, 10**30, -5])
        rec = f"size={size}\n"
        rec = f"{len(rec) + len(str(len(rec) + 3)) + 1} {rec}"
        b[h:h] = _pax(rec.encode())
    elif kind == "pax-path":
        rec = rng.choice([b"14 path=a.b.c\n", b"99 path=x\n", b"0 path=x\n", b"12 path=../x\n", b"9 nonsense"])
        b[h:h] = _pax(rec)
    elif kind == "pax-chain":
        b[h:h] = _pax(b"14 path=a.b.c\n") * rng.choice([2, 9, 300])
    elif kind == "type":
        hb = bytearray(b[h:h + 512])
        hb[156:157] = rng.choice([b"1", b"2", b"5", b"g", b"L", b"Z"])
        b[h:h + 512] = _checksum(hb)
    else:   # a member name with a refused or unknown extension, or escaping the folder
        hb = bytearray(b[h:h + 512])
        name = rng.choice([b"k.PKL", b"../k.cls", b"/abs.cls", b"k.f1.jpg", b"k.spec.Pickle", b"noext"])
        hb[:100] = name.ljust(100, b"\0")
        b[h:h + 512] = _checksum(hb)
    return kind, bytes(b)


def _headers(data: bytes) -> list[int]:
    import io
    import tarfile
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [m.offset for m in tar]


def _run(clean, tmp_path, seeds):
    out, split, entries = clean
    shard = entries[0].shard
    data = (out / shard).read_bytes()
    headers = _headers(data)
    keys = {e.key for e in entries}
    kinds: dict[str, int] = {}
    for seed in seeds:
        kind, mutant = mutate(data, headers, random.Random(seed))
        kinds[kind] = kinds.get(kind, 0) + 1
        work = tmp_path / f"m{seed}"
        shutil.copytree(out, work)
        (work / shard).write_bytes(mutant)
        v = verdict(work, split, index_keys=keys)
        assert v.seconds < TIME_BOUND_S, (seed, kind, v)
        if mutant != data:
            assert v.verify_checks, (seed, kind, "verify missed a mutant")
        assert_agree(v, f"seed {seed} ({kind})")
        shutil.rmtree(work)
    return kinds


def test_fuzz_corpus(clean, tmp_path):
    kinds = _run(clean, tmp_path, range(N_DEFAULT))
    assert len(kinds) >= 10      # the seeds reach most mutation kinds


@pytest.mark.slow
def test_fuzz_corpus_long(clean, tmp_path):
    _run(clean, tmp_path, range(N_DEFAULT, N_DEFAULT + N_SLOW))
