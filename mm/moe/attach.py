"""``attach_experts``: put modality experts into a transformers decoder without forking its modeling file.

Per chosen decoder layer, the FFN modules and (optionally) every attention projection that the family's
declared layout names (mm/moe/layouts.py) get a routed forward (mm/moe/routed.py); the experts start as exact
copies of those modules and are registered under ``model.moe``. A forward pre-hook on the decoder tells each
pass which of its tokens are image tokens (mm/moe/experts.py). Families without a declared layout, and
requests a layout cannot serve completely, are refused with one line.
"""
from __future__ import annotations

import copy

from torch import nn

from mm.config import MoEConfig
from mm.errors import MMError
from mm.moe.experts import ModalityExperts
from mm.moe.layouts import check_layer, decoder_layers, layout_for
from mm.moe.routed import ModalityForward
from mm.moe.routers import ROUTERS


def chosen_layers(config: MoEConfig, num_layers: int) -> list[int]:
    """Validate the config; return the sorted decoder-layer indices that get experts."""
    if not (config.ffn_experts or config.attn_experts):
        raise MMError("moe: set ffn_experts and/or attn_experts")
    check_router(config, None)
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


def check_router(config: MoEConfig, layout) -> None:
    """The router's own check of the config (and of the LLM's layout, when known)."""
    check = ROUTERS.entry(config.router.name).extras.get("check")
    if check is not None:
        check(config, layout)


def attach_experts(model, config: MoEConfig) -> ModalityExperts:
    """Give ``model`` (a MultimodalModel) modality experts; sets and returns ``model.moe``."""
    if model.moe is not None:
        raise MMError("this model already has modality experts")
    layout = layout_for(model.llm)
    layers = decoder_layers(model.llm)
    indices = chosen_layers(config, len(layers))
    check_router(config, layout)
    for i in indices:  # every layer is checked before any is changed
        check_layer(layout, layers[i], i)
    moe = ModalityExperts(config)
    width = model.llm.get_input_embeddings().embedding_dim
    for i in indices:
        key, layer = str(i), layers[i]
        if config.ffn_experts:
            ROUTERS.entry(config.router.name).builder(moe, layer, layout, key, width, config.router.options)
        if config.attn_experts:
            attention = getattr(layer, layout.attention)
            modules = {n: getattr(attention, n) for n in layout.projections}
            group = moe.attn_experts[key] = nn.ModuleDict({n: copy.deepcopy(m) for n, m in modules.items()})
            for n, module in modules.items():
                module.forward = ModalityForward(module, group[n], moe, f"moe.attn_experts.{key}.{n}")
    model.moe = moe
    model.llm.get_decoder().register_forward_pre_hook(moe.begin_pass, with_kwargs=True)
    return moe
