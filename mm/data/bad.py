"""Bad-sample policy: a document that cannot be used is skipped, counted by reason with its shard and key,
logged (rate-limited), and never reaches the model; past ``data.max_bad_fraction`` bad documents the run stops.

Two families of reasons:

- **bad** (``BAD_REASONS``): the data is broken (corrupt image, malformed JSON, ``<image>`` markers that do not
  match the images, ...). These count toward ``max_bad_fraction``.
- **dropped** (``DROP_REASONS``): a valid document this run cannot use (another kind than the run asks for, too
  long for ``seq_len``, more image tokens than the budget allows, nothing to learn from, or, in ``mm eval``,
  without what the task needs). Counted and logged, never "bad".
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from mm.errors import MMError

log = logging.getLogger("mm.data")

BAD_REASONS = ("corrupt_image", "truncated_image", "decompression_bomb", "zero_bytes", "missing_member",
               "malformed_json", "image_mismatch", "truncated_tar")
DROP_REASONS = ("kind_mismatch", "too_long", "too_many_image_tokens", "no_target",
                "task_mismatch")  # task_mismatch: mm eval only
_QUIET = ("kind_mismatch", "task_mismatch")  # expected in mixed corpora: logged at INFO, not WARNING
REASONS = BAD_REASONS + DROP_REASONS
EXAMPLES_PER_REASON = 5  # (shard, key, detail) kept per reason; counts are exact, examples bounded


class BadSample(Exception):
    """A document that cannot be used; ``reason`` is one of ``REASONS``. ``key`` and ``shard`` name it (filled
    in by whoever knows them: the loader sets them from the raw sample)."""

    def __init__(self, reason: str, detail: str, key: str = "", shard: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.key, self.shard = reason, detail, key, shard

    @property
    def where(self) -> str:
        return where(self.key, self.shard)


def where(key: str, shard: str) -> str:
    """``document K of SHARD`` (or as much of it as is known)."""
    if key and shard:
        return f"document {key} of {shard}"
    return f"document {key}" if key else (f"shard {shard}" if shard else "a document")


def _report_at(count: int) -> bool:
    """Log the 1st, 10th, 100th, ... document of a reason: a handful of lines even on a web-scale crawl."""
    return str(count).rstrip("0") == "1"


class BadCounter:
    """Counts usable (``good``), ``bad`` and ``dropped`` documents by reason, keeps the first few examples of
    each reason (shard, key, detail), logs the 1st/10th/100th/... of each reason, and raises MMError once
    bad/seen exceeds ``max_fraction`` (checked after ``min_seen`` documents, and at the end of a finite pass via
    ``check(final=True)``). ``keep=None`` keeps every example (evaluation sets); ``log=False`` leaves the
    reporting to the caller."""

    def __init__(self, max_fraction: float = 1.0, min_seen: int = 100, keep: int | None = EXAMPLES_PER_REASON,
                 log: bool = True):
        self.max_fraction, self.min_seen, self.keep, self.log_skips = max_fraction, min_seen, keep, log
        self.good = 0
        self.bad: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.examples: dict[str, list[dict[str, str]]] = {}

    @property
    def seen(self) -> int:
        return self.good + sum(self.bad.values()) + sum(self.dropped.values())

    def ok(self) -> None:
        self.good += 1

    def record(self, error: BadSample) -> None:
        """Count a skipped document (bad or dropped, by its reason), keep it as an example, maybe log it."""
        counts = self.dropped if error.reason in DROP_REASONS else self.bad
        counts[error.reason] += 1
        n = counts[error.reason]
        examples = self.examples.setdefault(error.reason, [])
        if self.keep is None or len(examples) < self.keep:
            examples.append({"shard": error.shard, "key": error.key, "detail": error.detail})
        if self.log_skips and _report_at(n):
            level = logging.INFO if error.reason in _QUIET else logging.WARNING
            if n == 1:
                log.log(level, "skipping %s (%s: %s); further %s documents are counted and reported at the "
                        "10th, 100th, ...", error.where, error.reason, error.detail, error.reason)
            else:
                log.log(level, "skipped %d documents for %s so far; latest: %s (%s)", n, error.reason, error.where,
                        error.detail)
        if counts is self.bad:
            self.check()

    def check(self, final: bool = False) -> None:
        bad = sum(self.bad.values())
        if not bad or (self.seen < self.min_seen and not final):
            return
        if bad > self.max_fraction * self.seen:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.bad.items()))
            example = self.example(max(self.bad, key=self.bad.__getitem__))
            raise MMError(f"too many bad samples: {bad} of {self.seen} ({bad / self.seen:.1%}) exceed "
                          f"data.max_bad_fraction={self.max_fraction} ({reasons}; e.g. {example})")

    def example(self, reason: str) -> str:
        """``document <key> of <shard>: <detail>`` of the first example of ``reason``."""
        first = (self.examples.get(reason) or [{"key": "", "shard": "", "detail": ""}])[0]
        return f"{where(first['key'], first['shard'])}: {first['detail']}"

    def metrics(self) -> dict[str, int]:
        """Flat counts for a run's metrics: ``data/good``, ``bad/<reason>``, ``dropped/<reason>``."""
        return {"data/good": self.good, **{f"bad/{k}": v for k, v in sorted(self.bad.items())},
                **{f"dropped/{k}": v for k, v in sorted(self.dropped.items())}}

    def documents(self) -> list[dict[str, str]]:
        """The kept examples as ``{"key", "shard", "reason", "detail"}`` rows, in reason order."""
        return [{"key": e["key"], "shard": e["shard"], "reason": reason, "detail": e["detail"]}
                for reason, examples in self.examples.items() for e in examples]

    def summary(self) -> dict[str, Any]:
        return {"good": self.good, "bad": dict(self.bad), "dropped": dict(self.dropped),
                "examples": {k: list(v) for k, v in self.examples.items()}}

    @classmethod
    def merged(cls, summaries: list[dict[str, Any]], keep: int | None = EXAMPLES_PER_REASON) -> "BadCounter":
        """One counter holding the sum of several ``summary()`` dicts (one per DataLoader worker)."""
        total = cls(keep=keep)
        for summary in summaries:
            total.good += summary["good"]
            total.bad.update(summary["bad"])
            total.dropped.update(summary["dropped"])
            for reason, examples in summary["examples"].items():
                kept = total.examples.setdefault(reason, [])
                kept.extend(examples[: None if keep is None else max(0, keep - len(kept))])
        return total
