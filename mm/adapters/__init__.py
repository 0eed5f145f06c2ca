"""Adapters (projectors) from encoder tokens to LLM embeddings; importing this registers all of them."""
from mm.adapters import linear, mlp, pixel_shuffle, pool, resampler  # noqa: F401  (registration)
from mm.adapters.base import ADAPTERS, Adapter

__all__ = ["ADAPTERS", "Adapter"]
