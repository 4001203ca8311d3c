"""Verdicts of ``avprep verify`` and the training loader on one (possibly damaged) dataset, for
the hostile-shard and fuzz tests: which samples each rejects, what the loader yields, and any
error that escaped (which must be one of the project's typed errors)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from avprep.errors import AvprepError
from avprep.verify import verify
from ogmge_train.data import make_loader
from ogmge_train.errors import TrainError


@dataclass
class Verdict:
    verify_keys: set[str] = field(default_factory=set)      # samples verify reports a problem for
    verify_checks: set[str] = field(default_factory=set)
    loader_yielded: set[str] = field(default_factory=set)
    loader_skipped: set[str] = field(default_factory=set)
    loader_labels: dict[str, int] = field(default_factory=dict)     # key -> label of what it yielded
    loader_error: BaseException | None = None
    seconds: float = 0.0


def verdict(out, split: str = "val", index_keys: set[str] | None = None) -> Verdict:
    """Run verify and an evaluation pass of the loader (no skip limit) over ``out``."""
    v = Verdict()
    start = time.perf_counter()
    report = verify(out)
    v.verify_checks = {p.check for p in report.problems}
    v.verify_keys = {p.key for p in report.problems if p.key and (index_keys is None or p.key in index_keys)}
    try:
        loader = make_loader(out, split, train=False, batch_size=2, frames=1, image_size=8, workers=0,
                             max_bad_samples=10**9,
                             on_bad_sample=lambda url, key, msg: v.loader_skipped.add(key))
        for batch in loader:
            v.loader_yielded.update(batch["key"])
            v.loader_labels.update(zip(batch["key"], batch["label"].tolist()))
    except (AvprepError, TrainError) as e:
        v.loader_error = e
    v.seconds = time.perf_counter() - start
    return v


def assert_agree(v: Verdict, what: str = "") -> None:
    """The loader never yields a sample verify rejects, and skips exactly the samples verify
    rejects (unless it refused the dataset as a whole with a typed error)."""
    assert not v.loader_yielded & v.verify_keys, (what, v)
    if v.loader_error is None:
        assert v.loader_skipped == v.verify_keys, (what, v)
    else:
        assert v.verify_keys or v.verify_checks, (what, v)     # verify found something too
