"""Causal LMs: the registry and the builders that fill it (imported here so registration happens)."""
from mm.llm import smollm2, tiny  # noqa: F401  (registers builders)
from mm.llm.base import LLMS, CHATML_TEMPLATE, load_local, prepare_tokenizer

__all__ = ["LLMS", "CHATML_TEMPLATE", "load_local", "prepare_tokenizer"]
