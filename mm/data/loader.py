"""``build_loader``: shards -> training batches (the batch contract of mm.train).

Pipeline per (rank, worker) "slot": shard lists of each source -> split by slot -> per-source sample streams
(resampled forever or one pass) -> weighted mixing -> shuffle buffer -> parse + render + decode -> pack (or pad)
-> collate. A document that cannot be used (bad data, another kind, too long) never reaches a batch: it is
skipped, counted by reason with its shard and key (``loader.counter``, ``loader.metrics()``) and logged
(rate-limited); ``data.max_consecutive_skips`` candidates in a row without a usable one stop the run with why,
instead of a silent endless search. Every random choice comes from RNGs seeded by ``data.seed`` and the slot,
so a run is a pure function of (shards, config, world size, workers). Resuming with ``skip_batches=N`` replays
the stream without transforming images or collating and yields batch N onwards.
"""
from __future__ import annotations

import dataclasses
import random
from collections import Counter
from typing import Any, Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mm.data.bad import BadCounter, BadSample
from mm.data.config import DataConfig, check_data
from mm.data.pack import Packer, collate_packed, collate_preference, collate_rows
from mm.data.render import Item, Renderer
from mm.data.shards import TarError, iter_members, list_shards, parse_sample
from mm.errors import MMError

LOADER_KINDS = ("lm", "chat", "interleaved", "preference")


def _sources(data: DataConfig) -> tuple[list[list[str]], list[float]]:
    if not data.train:
        raise MMError("data.train is empty: give a shard directory, a glob, or a list of them")
    specs = data.train if isinstance(data.train, (list, tuple)) else [data.train]
    weights = list(data.weights) if data.weights is not None else [1.0] * len(specs)
    if len(weights) != len(specs):
        raise MMError(f"data.weights has {len(weights)} entries but data.train has {len(specs)} sources")
    if any(w < 0 for w in weights) or not sum(weights) > 0:
        raise MMError(f"data.weights must be non-negative with a positive sum, got {weights}")
    return [list_shards(spec) for spec in specs], weights


def shuffled(stream: Iterator, size: int, rng: random.Random) -> Iterator:
    """Classic shuffle buffer: keep ``size`` items, emit a random one as each new one arrives."""
    if size <= 1:
        yield from stream
        return
    buffer: list = []
    for item in stream:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


class DocStream(IterableDataset):
    """The per-slot pipeline. ``__iter__`` yields collated batches; ``counter`` holds the bad-sample counts of
    the last iteration in this process (per worker when ``num_workers > 0``)."""

    def __init__(self, data: DataConfig, renderer: Renderer, pad_id: int, rank: int, world_size: int,
                 skip_batches: int, kind: str):
        self.data, self.renderer, self.pad_id = data, renderer, pad_id
        self.rank, self.world_size, self.skip_batches, self.kind = rank, world_size, skip_batches, kind
        self.sources, self.weights = _sources(data)
        self.counter = BadCounter(data.max_bad_fraction, data.bad_min_seen)

    # ----- raw samples ------------------------------------------------------------------------------------
    def _source(self, index: int, slot: int, slots: int) -> Iterator[dict]:
        shards = self.sources[index]
        epoch = 0
        while True:
            order = list(shards)
            random.Random(f"{self.data.seed}/{index}/{epoch}").shuffle(order)  # same order in every slot
            by_shard = len(order) >= slots
            mine = order[slot::slots] if by_shard else order
            position = given = 0
            for path in mine:
                try:
                    for sample in iter_members(path):
                        position += 1
                        if by_shard or (position - 1) % slots == slot:
                            given += 1
                            yield sample
                except TarError as exc:
                    self.counter.record(BadSample("truncated_tar", str(exc).removeprefix(f"{path}: "), shard=path))
            if not self.data.resample:
                return
            if given == 0:  # resampling would read these shards forever without yielding a sample
                if position:
                    raise MMError(f"source {index} ({shards[0]} ...) has {position} samples, fewer than the {slots} "
                                  "readers (ranks x data.num_workers) that split it: use fewer workers or more data")
                which = f"the {len(mine)} shards of reader {slot} of {slots}" if by_shard else "its shards"
                raise MMError(f"source {index} ({shards[0]} ...): {which} hold no readable samples; cannot "
                              "resample them")
            epoch += 1

    def _mixed(self, slot: int, slots: int) -> Iterator[dict]:
        streams = [self._source(i, slot, slots) for i in range(len(self.sources))]
        weights = list(self.weights)
        rng = random.Random(f"{self.data.seed}/mix/{slot}")
        live = [i for i, w in enumerate(weights) if w > 0]
        while live:
            i = rng.choices(live, weights=[weights[j] for j in live])[0]
            try:
                yield next(streams[i])
            except StopIteration:
                live.remove(i)

    # ----- documents --------------------------------------------------------------------------------------
    def _items(self, slot: int, slots: int) -> Iterator[Item]:
        rng = random.Random(f"{self.data.seed}/shuffle/{slot}")
        streak = Streak(self.data.max_consecutive_skips, self.kind)
        for sample in shuffled(self._mixed(slot, slots), self.data.shuffle_buffer, rng):
            doc = None
            try:
                doc, images = parse_sample(sample)
                item = self.renderer.item(sample["__key__"], doc, images, self.kind)
            except BadSample as exc:
                exc.key, exc.shard = sample["__key__"], sample.get("__url__", "")
                self.counter.record(exc)
                streak.skip(exc, doc)
                continue
            self.counter.ok()
            streak.reset()
            yield item
        self.counter.check(final=True)

    def _groups(self, items: Iterator[Item]) -> Iterator[Any]:
        if self.kind != "preference" and self.data.pack:
            yield from Packer(self.data.seq_len, self.data.batch_size,
                              max_image_tokens=self.data.max_row_image_tokens)(items)
            return
        group: list[Item] = []
        for item in items:
            group.append(item)
            if len(group) == self.data.batch_size:
                yield group
                group = []
        if group:
            yield group

    def collate(self, group) -> dict:
        transform = self.renderer.transform
        if self.kind == "preference":
            return collate_preference(group, self.pad_id, transform)
        if self.data.pack:
            return collate_packed(group, self.pad_id, transform)
        return collate_rows(group, self.pad_id, transform)

    def _batches(self, worker: int, workers: int) -> Iterator[dict]:
        logical = (worker + self.skip_batches) % workers  # DataLoader restarts its round robin at worker 0
        skip = len(range(logical, self.skip_batches, workers))
        slot, slots = self.rank * workers + logical, self.world_size * workers
        self.counter = BadCounter(self.data.max_bad_fraction, self.data.bad_min_seen)
        for index, group in enumerate(self._groups(self._items(slot, slots))):
            if index >= skip:
                yield self.collate(group)

    def __iter__(self) -> Iterator:
        """Batches; in a DataLoader worker ``("batch", batch, worker, counts)``, then ``("done", None, ...)`` at the
        end of a finite pass or ``("error", message, ...)`` on an MMError, so that the main process has every
        worker's counts (even a worker without a batch) and a one-line error."""
        info = get_worker_info()
        if info is None:
            yield from self._batches(0, 1)
            return
        try:
            for batch in self._batches(info.id, info.num_workers):
                yield "batch", batch, info.id, self.counter.summary()
        except MMError as exc:
            yield "error", str(exc), info.id, self.counter.summary()
            return
        yield "done", None, info.id, self.counter.summary()


class Streak:
    """Consecutive candidates that gave no usable document. ``limit`` of them in a row (0: no limit) raise
    MMError saying what was skipped and why: a stream that can never yield a batch stops instead of hanging."""

    def __init__(self, limit: int, kind: str):
        self.limit, self.kind = limit, kind
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.reasons: Counter[str] = Counter()
        self.kinds: Counter[str] = Counter()  # document kinds of the kind_mismatch skips
        self.first: dict[str, BadSample] = {}

    def skip(self, error: BadSample, doc: dict | None) -> None:
        self.count += 1
        self.reasons[error.reason] += 1
        self.first.setdefault(error.reason, error)
        if error.reason == "kind_mismatch" and doc is not None:
            self.kinds[doc["kind"]] += 1
        if self.limit and self.count >= self.limit:
            raise MMError(self.message())

    def message(self) -> str:
        parts = []
        for reason, n in self.reasons.most_common():
            if reason == "kind_mismatch":
                held = ", ".join(f"{v} {k}" for k, v in self.kinds.most_common())
                why = f"the run reads {self.kind} documents, as stage.kind or the loss asks; these were {held}"
            else:
                why = f"e.g. {self.first[reason].where}: {self.first[reason].detail}"
            parts.append(f"{n} {reason} ({why})")
        return f"no usable document in the last {self.count} candidates: " + "; ".join(parts)


class Loader:
    """An iterable of batches; each ``iter()`` starts the same deterministic stream again."""

    def __init__(self, dataset: DocStream, num_workers: int):
        self.dataset, self.num_workers = dataset, num_workers
        self._worker_counts: dict[int, dict] = {}

    @property
    def counter(self) -> BadCounter:
        """Skipped documents by reason, with examples (shard, key, detail), of the current iteration: this
        process's, or the sum over DataLoader workers as of their latest batch."""
        if self.num_workers == 0:
            return self.dataset.counter
        return BadCounter.merged(list(self._worker_counts.values()))

    def metrics(self) -> dict[str, int]:
        """``data/good``, ``bad/<reason>``, ``dropped/<reason>`` counts for the run's metrics."""
        return self.counter.metrics()

    def __iter__(self) -> Iterator[dict]:
        given = False
        for batch in iter(self.dataset) if self.num_workers == 0 else self._from_workers():
            given = True
            yield batch
        counter = self.counter
        if not given and counter.good == 0 and counter.seen:  # a finite pass that had nothing usable
            reasons = {**counter.bad, **counter.dropped}
            parts = [f"{n} {reason} (e.g. {counter.example(reason)})" for reason, n in
                     sorted(reasons.items(), key=lambda kv: -kv[1])]
            raise MMError(f"no usable document in the {counter.seen} documents of the pass: " + "; ".join(parts))

    def _from_workers(self) -> Iterator[dict]:
        self._worker_counts = {}
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, persistent_workers=False,
                            prefetch_factor=2)
        for tag, payload, worker, counts in loader:
            self._worker_counts[worker] = counts
            if tag == "error":
                raise MMError(payload)
            if tag == "batch":
                yield payload


def build_loader(data: DataConfig, model, rank: int = 0, world_size: int = 1, skip_batches: int = 0,
                 kind: str | None = None) -> Loader:
    """Batches for ``model`` (which supplies tokenizer, encoder transform, image_token_id, tokens_per_image).

    ``kind``: None or "lm" (chat + interleaved; preference docs train on their chosen answer), "chat" or
    "interleaved" (only that kind), "preference" (chosen/rejected pairs). Resuming needs the same shards,
    config, world size and ``num_workers``.
    """
    kind = kind or "lm"
    if kind not in LOADER_KINDS:
        raise MMError(f"unknown loader kind {kind!r}; choose one of: {', '.join(LOADER_KINDS)}")
    if not 0 <= rank < world_size:
        raise MMError(f"rank {rank} is outside world_size {world_size}")
    check_data(data)
    if isinstance(model, Renderer):
        renderer = dataclasses.replace(model, seq_len=data.seq_len)
    else:
        renderer = Renderer.from_model(model, data.seq_len)
    renderer = dataclasses.replace(renderer, max_row_image_tokens=data.max_row_image_tokens)
    pad_id = renderer.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = renderer.tokenizer.eos_token_id
    dataset = DocStream(data, renderer, pad_id, rank, world_size, max(0, int(skip_batches)), kind)
    return Loader(dataset, data.num_workers)
