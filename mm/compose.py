"""``build``: a MultimodalModel from a ModelConfig, with each part taken from its registry."""
from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import mm.adapters  # noqa: F401  (registers adapters)
import mm.encoders  # noqa: F401  (registers encoders)
import mm.llm  # noqa: F401  (registers LLMs)
from mm.adapters.base import ADAPTERS
from mm.config import ModelConfig
from mm.encoders.base import ENCODERS, VisionEncoder
from mm.errors import MMError
from mm.llm.base import LLMS, prepare_tokenizer
from mm.model import MultimodalModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise MMError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[name]


def build_encoder(config: ModelConfig, pretrained: bool) -> VisionEncoder:
    builder, arg = ENCODERS.get(config.encoder)
    return builder(arg, config, pretrained)


def assemble(
    config: ModelConfig, encoder: VisionEncoder, llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> MultimodalModel:
    """Add the adapter (and modality experts) around a given encoder and LLM; apply default freezing."""
    builder, _ = ADAPTERS.get(config.adapter)
    adapter = builder(encoder, llm.get_input_embeddings().embedding_dim, config)
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
    llm_builder, arg = LLMS.get(config.llm)
    llm, tokenizer = llm_builder(arg, config)
    return assemble(config, encoder, llm, tokenizer)
