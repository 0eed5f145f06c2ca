"""The transformers KV-cache internals that ``mm.fast_generate`` relies on, and nothing else, in one place.

Fast greedy decoding uses transformers' ``StaticCache`` below its public surface: it copies key/values into and
out of the preallocated layers (prefix reuse) and relies on two conventions of the supported versions:
- a ``StaticLayer`` writes each call's key/values at its own counter ``cumulative_length`` (not at the
  ``position_ids``), so left-padded rows share cache slots while their positions differ;
- the attention mask of a static cache spans ``max_cache_len`` slots: a fixed ``[B, S]`` mask for every step.

The API (every function works on any causal LM built by ``mm.llm``):
- ``check()``: raise one ``MMError`` line naming the installed version and ``SUPPORTED`` when this transformers
  breaks any of the above; ``supported()``: the same as a bool; ``problem()``: the reason, or None. All three
  decide once per process; ``incompatibility(version)`` decides afresh.
- ``new_static_cache(llm, max_len)``: an empty cache for ``max_len`` tokens (batch, dtype, device set lazily
  by the first forward).
- ``forward(llm, cache, **inputs)``: ``llm(**inputs)`` reading and extending ``cache``.
- ``is_plain_static(cache)``: every layer a full-length static layer, so ``snapshot``/``restore`` are exact.
- ``snapshot(cache, length)`` -> ``KV``; ``restore(cache, kv, length, batch)``: the first ``length`` slots
  of row 0, kept; copied into every row of an empty cache, whose next write then lands at ``length``.

tests/llm/test_kv_cache_compat.py exercises exactly these internals against the installed transformers.
"""
from __future__ import annotations

import functools

import torch
import transformers
from packaging.version import Version

from mm.errors import MMError

try:
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer
except ImportError as exc:  # reported by check(); mm still imports and decodes through generate
    StaticCache = StaticLayer = None
    _MISSING = f"{type(exc).__name__}: {exc}"

SUPPORTED = ">=5.4,<6"  # keep equal to the transformers pin in pyproject.toml
_LOWEST, _BELOW = Version("5.4"), Version("6")  # 5.4: StaticLayer writes at its own counter (5.0-5.3: cache_position)
_KEYWORD = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"  # renamed in 5.24

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [1, H, P, d]


def incompatibility(version: str | None = None) -> str | None:
    """Why the installed transformers, reported as ``version`` (default: its own), cannot run fast decoding, or
    None. The version must lie in ``SUPPORTED`` and a toy ``StaticLayer`` must write at its counter."""
    version = version or transformers.__version__
    where = f"transformers {version} is installed; mm's fast decoding supports transformers{SUPPORTED}"
    if not _LOWEST <= Version(version) < _BELOW:
        return where
    if StaticLayer is None:
        return f"{where}, but its static cache is missing ({_MISSING})"
    try:  # the write-at-counter convention, on a two-slot toy layer
        layer, k = StaticLayer(max_cache_len=4), torch.ones(1, 1, 2, 1)
        layer.update(k, 2 * k)
        layer.update(3 * k, 4 * k, {"cache_position": torch.arange(2)})  # older convention would overwrite 0, 1
        ok = (layer.keys[0, 0, :, 0].tolist() == [1, 1, 3, 3] and layer.values[0, 0, :, 0].tolist() == [2, 2, 4, 4]
              and int(layer.cumulative_length.reshape(-1)[0]) == 4 and layer.is_initialized)
    except Exception as exc:  # any failure of the probe means the internals changed
        return f"{where}, but its StaticLayer differs ({type(exc).__name__}: {exc})"
    return None if ok else f"{where}, but its StaticLayer no longer writes at cumulative_length"


@functools.cache
def problem() -> str | None:
    """``incompatibility()`` of the installed transformers, decided once per process."""
    return incompatibility()


def supported() -> bool:
    """True when the installed transformers runs fast decoding."""
    return problem() is None


def check() -> None:
    """Raise ``MMError`` (one line: installed version, supported range) unless ``supported()``."""
    if problem() is not None:
        raise MMError(f"{problem()}; decode with generate or install a supported transformers")


def new_static_cache(llm, max_len: int) -> StaticCache:
    """An empty static cache for ``llm`` holding ``max_len`` tokens per row."""
    return StaticCache(config=llm.config, max_cache_len=max_len)


def forward(llm, cache: StaticCache, **inputs):
    """``llm(**inputs, use_cache=True)`` reading and extending ``cache``."""
    return llm(**inputs, **{_KEYWORD: cache}, use_cache=True)


def is_plain_static(cache: StaticCache) -> bool:
    """Every layer keeps all ``max_len`` slots (no sliding window, no offloading): prefix copies are exact."""
    return all(type(layer) is StaticLayer for layer in cache.layers)


def snapshot(cache: StaticCache, length: int) -> KV:
    """Copies of the first ``length`` key/value slots of row 0, per layer ``[1, H, length, d]``."""
    return [(layer.keys[:1, :, :length].clone(), layer.values[:1, :, :length].clone()) for layer in cache.layers]


def restore(cache: StaticCache, kv: KV, length: int, batch: int) -> None:
    """Fill the first ``length`` slots of every row of the unused ``cache`` from ``kv``; later writes follow them."""
    for layer, (keys, values) in zip(cache.layers, kv):
        if not layer.is_initialized:
            layer.lazy_initialization(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1))
        layer.keys[:, :, :length].copy_(keys[:, :, :length])
        layer.values[:, :, :length].copy_(values[:, :, :length])
        layer.cumulative_length.fill_(length)
