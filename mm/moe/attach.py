"""``attach_experts``: put modality experts into a transformers decoder without forking its modeling file.

Per chosen decoder layer: ``layer.mlp`` and (optionally) the attention projections are replaced by routed,
transparent stand-ins (mm/moe/routed.py); the experts themselves start as exact copies of the LLM's modules
and are registered under ``model.moe``. Supported layouts: Llama / Qwen2 / Mistral style
(``model.layers[i].self_attn.{q,k,v,o}_proj``, ``.mlp``) and GPT-2 style (``transformer.h[i].attn.{c_attn,
c_proj}``, ``.mlp``).
"""
from __future__ import annotations

import copy

from torch import nn

from mm.config import MoEConfig
from mm.errors import MMError
from mm.moe.experts import ModalityExperts
from mm.moe.routed import ModalityRouted, TopKRouted

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "c_proj")
ROUTERS = ("modality", "topk")


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    decoder = llm.get_decoder() if hasattr(llm, "get_decoder") else llm
    for name in ("layers", "h"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise MMError(f"modality experts: cannot find the decoder layers of {type(llm).__name__} "
                  "(supported: Llama/Qwen2/Mistral-style .layers, GPT-2-style .h)")


def _attention(layer: nn.Module) -> nn.Module:
    for name in ("self_attn", "attn"):
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module):
            return module
    raise MMError(f"modality experts: {type(layer).__name__} has no self_attn/attn module")


def chosen_layers(config: MoEConfig, num_layers: int) -> list[int]:
    """Validate the config; return the sorted decoder-layer indices that get experts."""
    if config.router not in ROUTERS:
        raise MMError(f"moe.router {config.router!r}: choose one of: {', '.join(ROUTERS)}")
    if not (config.ffn_experts or config.attn_experts):
        raise MMError("moe: set ffn_experts and/or attn_experts")
    if config.router == "topk":
        if not config.ffn_experts:
            raise MMError("moe.router=topk routes FFN experts: set ffn_experts=true")
        if not (isinstance(config.num_experts, int) and config.num_experts >= 1):
            raise MMError(f"moe.num_experts must be a positive integer, got {config.num_experts!r}")
        if not (isinstance(config.top_k, int) and 1 <= config.top_k <= config.num_experts):
            raise MMError(f"moe.top_k must be an integer from 1 to num_experts={config.num_experts}, "
                          f"got {config.top_k!r}")
    if config.layers == "all":
        return list(range(num_layers))
    if not isinstance(config.layers, (list, tuple)) or not config.layers or \
            not all(isinstance(i, int) and not isinstance(i, bool) for i in config.layers):
        raise MMError(f"moe.layers must be 'all' or a non-empty list of layer indices, got {config.layers!r}")
    bad = [i for i in config.layers if not -num_layers <= i < num_layers]
    if bad:
        raise MMError(f"moe.layers {bad} out of range: the LLM has {num_layers} layers (0..{num_layers - 1})")
    indices = sorted({i % num_layers for i in config.layers})
    if len(indices) != len(config.layers):
        raise MMError(f"moe.layers {config.layers} names a layer twice")
    return indices


def attach_experts(model, config: MoEConfig) -> ModalityExperts:
    """Give ``model`` (a MultimodalModel) modality experts; sets and returns ``model.moe``."""
    if model.moe is not None:
        raise MMError("this model already has modality experts")
    layers = decoder_layers(model.llm)
    indices = chosen_layers(config, len(layers))
    moe = ModalityExperts(config)
    width = model.llm.get_input_embeddings().embedding_dim
    for i in indices:
        key, layer = str(i), layers[i]
        if config.ffn_experts:
            mlp = layer.mlp
            if config.router == "topk":
                moe.ffn_experts[key] = nn.ModuleList(copy.deepcopy(mlp) for _ in range(config.num_experts))
                router = moe.router[key] = nn.Linear(width, config.num_experts, bias=False)
                nn.init.normal_(router.weight, std=0.02)
                layer.mlp = TopKRouted(mlp, router, moe.ffn_experts[key], moe, config.top_k,
                                       f"moe.ffn_experts.{key}")
            else:
                moe.ffn_experts[key] = copy.deepcopy(mlp)
                layer.mlp = ModalityRouted(mlp, moe.ffn_experts[key], moe, f"moe.ffn_experts.{key}")
        if config.attn_experts:
            attention = _attention(layer)
            names = [n for n in PROJECTIONS if isinstance(getattr(attention, n, None), nn.Module)]
            if not names:
                raise MMError(f"modality experts: no attention projections found in {type(attention).__name__}")
            experts = moe.attn_experts[key] = nn.ModuleDict({n: copy.deepcopy(getattr(attention, n)) for n in names})
            for n in names:
                setattr(attention, n, ModalityRouted(getattr(attention, n), experts[n], moe,
                                                     f"moe.attn_experts.{key}.{n}"))
    model.moe = moe
    model.llm.register_forward_pre_hook(moe.start_pass)
    return moe
