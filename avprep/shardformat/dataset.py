"""A dataset, opened: dataset.json, every split's manifest and the sample indexes, through the
typed readers of ``sidefiles``. The one entry point of every reader of an output."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..errors import StorageError
from ..storage import Location, Retry, open_location
from .errors import ShardDataError
from .names import DATASET, index_name, manifest_name, split_order
from .sidefiles import DatasetMeta, IndexEntry, Manifest, SampleIndex


@dataclass
class Dataset:
    """An extracted dataset as its side files describe it (:func:`open_dataset`): ``meta``
    (dataset.json), ``splits`` (each split's manifest, in split order) and, read on first use,
    each split's sample index (``index``). The loader, ``avprep verify``, ``avprep info`` and
    ``avprep index`` all open datasets here, so they accept and refuse the same files."""

    location: Location
    meta: DatasetMeta
    splits: dict[str, Manifest]
    _indexes: dict = field(default_factory=dict, repr=False)
    _checked: list | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def classes(self) -> list[str]:
        return self.meta.classes

    @property
    def num_classes(self) -> int:
        return len(self.meta.classes)

    def index(self, split: str, problems: list[ShardDataError] | None = None) -> list[IndexEntry]:
        """The sample index of ``split`` (one of ``splits``) in shard order, then byte order,
        checked against its manifest: the same shards with the same number of samples each.
        Raises ShardDataError when it is missing or malformed. A mismatch with the manifest
        raises too, or, with ``problems``, is appended there and the entries are returned anyway
        (so verify can check each one)."""
        if split not in self._indexes:
            self._indexes[split] = self._read_index(split)
        entries, mismatch = self._indexes[split]
        if mismatch is not None:
            if problems is None:
                raise mismatch
            problems.append(mismatch)
        return entries

    def check_indexes(self, problems: list[ShardDataError] | None = None) -> None:
        """Every split's index against dataset.json and each other, once: a key appears in one
        place only (a key in two shards is read twice; one in train and test is a leak) and each
        sample's label is the class dataset.json lists at its label_index (swapped class names
        would silently relabel the data). Raises the first ``ShardDataError`` (check ``index``,
        naming the index file, the key and both places), or with ``problems`` appends them all.
        A split whose index is missing or malformed is left to ``index``."""
        if self._checked is None:
            found: list[ShardDataError] = []
            seen: dict[str, tuple[str, str]] = {}
            classes = self.classes
            for split in self.splits:
                where = self.location.url(index_name(split))
                try:
                    entries = Dataset.index(self, split, problems=[])
                except ShardDataError:
                    continue
                for e in entries:
                    if e.key in seen:
                        other_split, other_shard = seen[e.key]
                        place = other_shard if other_split == split else f"{other_shard} of split {other_split}"
                        found.append(ShardDataError(f"{where}: key {e.key} of {e.shard} is also in {place} (a "
                                                    "sample must appear once: a leak between splits, or a "
                                                    "repeated clip)", check="index", shard=index_name(split),
                                                    key=e.key))
                        continue
                    seen[e.key] = (split, e.shard)
                    if e.label_index >= len(classes) or (e.label and e.label != classes[e.label_index]):
                        known = (f"dataset.json lists {classes[e.label_index]!r} at {e.label_index}"
                                 if e.label_index < len(classes) else f"dataset.json has {len(classes)} classes")
                        found.append(ShardDataError(f"{where}: sample {e.key} is labelled {e.label!r} (label_index "
                                                    f"{e.label_index}) but {known}", check="index",
                                                    shard=index_name(split), key=e.key))
            self._checked = found
        if problems is not None:
            problems.extend(self._checked)
        elif self._checked:
            raise self._checked[0]

    def _read_index(self, split: str) -> tuple[list[IndexEntry], ShardDataError | None]:
        name = index_name(split)
        where = self.location.url(name)
        try:
            data = self.location.read_bytes(name)
        except StorageError as e:
            raise ShardDataError(f"{where}: no sample index ({e}); add it with `avprep index OUT`", check="index",
                                 shard=name) from None
        entries = SampleIndex.from_json(data, split, where).entries
        manifest = self.splits[split]
        mismatch = None
        if Counter(e.shard for e in entries) != {s.name: s.num_samples for s in manifest.shards if s.num_samples}:
            mismatch = ShardDataError(f"{where}: does not match {manifest_name(split)} (samples per shard differ); "
                                      "rebuild it with `avprep index`", check="index", shard=name)
        order = {s.name: i for i, s in enumerate(manifest.shards)}
        entries.sort(key=lambda e: (order.get(e.shard, len(order)), e.offset))
        return entries, mismatch


def open_dataset(source, *, s3_endpoint: str | None = None, retry: Retry | None = None,
                 problems: list[ShardDataError] | None = None) -> Dataset:
    """The dataset at ``source`` (a folder, ``http(s)://`` or ``s3://`` prefix, or a
    ``storage.Location``): dataset.json and every split's manifest, parsed by the typed readers
    of this module.

    Raises StorageError when dataset.json cannot be read (no dataset there) and ShardDataError
    when it is malformed. A manifest that is malformed raises ShardDataError (one that cannot
    be read, StorageError); with ``problems``, either is appended there as a ShardDataError
    instead and its split left out, which is what ``avprep verify`` reports. So is a split size
    in dataset.json that is not its manifest's sample count."""
    loc = source if isinstance(source, Location) else open_location(source, s3_endpoint=s3_endpoint, retry=retry)
    meta = DatasetMeta.from_json(loc.read_bytes(DATASET), loc.url(DATASET))
    splits = {}
    for split in split_order(meta.splits):
        name = manifest_name(split)
        try:
            splits[split] = Manifest.from_json(loc.read_bytes(name), split, loc.url(name))
        except (StorageError, ShardDataError) as e:
            if problems is None:
                raise
            problems.append(e if isinstance(e, ShardDataError) else
                            ShardDataError(f"{loc.url(name)}: cannot read: {e}", check="manifest", shard=name))
    counted = meta.raw.get("splits")
    if isinstance(counted, dict):       # (an old dataset.json lists split names only)
        for split, manifest in splits.items():
            if counted.get(split) != manifest.num_samples:
                wrong = ShardDataError(f"{loc.url(DATASET)}: splits.{split} is {counted.get(split)!r} but "
                                       f"{manifest_name(split)} lists {manifest.num_samples} samples",
                                       check="manifest", shard=DATASET)
                if problems is None:
                    raise wrong
                problems.append(wrong)
    return Dataset(loc, meta, splits)
