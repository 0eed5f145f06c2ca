"""Bad-sample policy: skip, count by reason, log once per reason, stop past a bad fraction."""
from __future__ import annotations

import logging
from collections import Counter

from mm.errors import MMError

log = logging.getLogger("mm.data")

REASONS = ("corrupt_image", "truncated_image", "decompression_bomb", "zero_bytes", "missing_member",
           "malformed_json", "truncated_tar")


class BadSample(Exception):
    """A document that cannot be used; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class BadCounter:
    """Counts good and bad documents; raises MMError once bad/seen exceeds ``max_fraction`` (checked after
    ``min_seen`` documents, and at the end of a finite pass via ``check(final=True)``)."""

    def __init__(self, max_fraction: float, min_seen: int = 100):
        self.max_fraction, self.min_seen = max_fraction, min_seen
        self.good = 0
        self.bad: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()  # usable-but-unused documents (too long, other kind): not bad

    @property
    def seen(self) -> int:
        return self.good + sum(self.bad.values())

    def ok(self) -> None:
        self.good += 1

    def record(self, error: BadSample) -> None:
        if error.reason not in self.bad:
            log.warning("skipping bad sample (%s); further ones of this kind are counted silently: %s",
                        error.reason, error.detail)
        self.bad[error.reason] += 1
        self.check()

    def check(self, final: bool = False) -> None:
        bad = sum(self.bad.values())
        if not bad or (self.seen < self.min_seen and not final):
            return
        if bad > self.max_fraction * self.seen:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.bad.items()))
            raise MMError(f"too many bad samples: {bad} of {self.seen} ({bad / self.seen:.1%}) exceed "
                          f"data.max_bad_fraction={self.max_fraction} ({reasons})")

    def summary(self) -> dict:
        return {"good": self.good, "bad": dict(self.bad), "dropped": dict(self.dropped)}
