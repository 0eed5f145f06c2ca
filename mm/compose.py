"""Composing a MultimodalModel from its parts, each taken from its registry with its own options.

``build(config)``: pretrained encoder and LLM, fresh adapter. ``assemble``: the adapter (and modality experts)
around an encoder and an LLM already built (by ``build``, by ``mm.load`` from saved files, or on the meta device).
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mm.config import ModelConfig
from mm.encoders.base import VisionEncoder
from mm.errors import MMError
from mm.llm.base import prepare_tokenizer
from mm.model import MultimodalModel
from mm.parts import registry
from mm.registry import split_spec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise MMError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[name]


def build_encoder(config: ModelConfig, pretrained: bool, saved: Path | None = None) -> VisionEncoder:
    """The encoder part; ``saved``: the files it wrote with ``save_files`` (rebuilding a saved model)."""
    part = config.encoder
    builder = registry("encoder").entry(part.name).builder
    return builder(split_spec(part.name)[1], part.options, pretrained=pretrained, saved=saved)


def build_llm(config: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    part = config.llm
    return registry("llm").entry(part.name).builder(split_spec(part.name)[1], part.options)


def assemble(
    config: ModelConfig, encoder: VisionEncoder, llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> MultimodalModel:
    """Add the adapter (and modality experts) around a given encoder and LLM; apply default freezing."""
    builder = registry("adapter").entry(config.adapter.name).builder
    adapter = builder(encoder, llm.get_input_embeddings().embedding_dim, config.adapter.options)
    model = MultimodalModel(config, encoder, adapter, llm, prepare_tokenizer(tokenizer))
    if config.moe is not None:
        from mm.moe import attach_experts

        attach_experts(model, config.moe)
    model.encoder.requires_grad_(not config.freeze_encoder)
    model.llm.requires_grad_(not config.freeze_llm)
    if model.moe is not None:
        model.moe.requires_grad_(True)
    return model.to(torch_dtype(config.dtype)).eval()


def build(config: ModelConfig) -> MultimodalModel:
    """A new model with pretrained encoder and LLM weights and a freshly initialised adapter."""
    torch_dtype(config.dtype)
    encoder = build_encoder(config, pretrained=True)
    llm, tokenizer = build_llm(config)
    return assemble(config, encoder, llm, tokenizer)
