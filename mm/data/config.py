"""DataConfig: which shards feed a run and how they are batched."""
from __future__ import annotations

from dataclasses import dataclass, field

from mm.errors import MMError


@dataclass
class DataConfig:
    """Training data: shard sources with mixture weights, batching and packing.

    ``train`` is a shard directory, a glob, or a list of them; ``weights`` (same length) mixes the sources.
    ``val`` (same forms) holds held-out documents: one pass, unweighted, for the eval loss.
    """

    train: str | list[str] | None = None  # a shard directory, glob, or a list of them
    weights: list[float] | None = None
    val: str | list[str] | None = None  # held-out shards (like train) for the eval loss (trainer.eval_every)
    batch_size: int = 4  # rows per step (per process)
    seq_len: int = 512  # tokens per row
    pack: bool = True  # pack several documents per row (block-diagonal attention)
    max_row_image_tokens: int | None = None  # image tokens (tiles, thumbnails, separators) one row may hold
    shuffle_buffer: int = 256
    resample: bool = True  # loop over the sources forever (training); False = one pass
    num_workers: int = 0
    seed: int = 0
    max_bad_fraction: float = 0.05  # end the run when more than this fraction of samples is bad
    bad_min_seen: int = 100  # judge the bad fraction only after this many samples (or at the end of a pass)
    max_consecutive_skips: int = 1000  # stop when this many documents in a row are unusable (0 = never stop)


def check_data(data: DataConfig) -> None:
    """One-line MMError for batching values no loader can use (run before any engine starts)."""
    for key in ("batch_size", "seq_len", "max_row_image_tokens"):
        value = getattr(data, key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise MMError(f"data.{key} must be a positive integer, got {value!r}")
    if data.max_consecutive_skips < 0:
        raise MMError(f"data.max_consecutive_skips must be 0 (no limit) or positive, got {data.max_consecutive_skips}")
