"""Where modality experts attach, declared per LLM family: ``LAYOUTS``, keyed by ``llm.config.model_type``.

A :class:`Layout` describes a decoder layer completely: where the layers are, which modules make up its FFN,
which module is its self-attention and every projection inside it, and its norms. ``attach_experts`` covers
exactly what is declared and checks each chosen layer against it first: a family with no layout, or a layer
holding parameters the layout does not name (GPT-2 built with cross-attention, an attention with extra
weights), is refused with one line, so experts never cover part of an FFN or of an attention.

Adding a family is one entry: ``LAYOUTS["<model_type>"] = Layout(...)``.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mm.errors import MMError


@dataclass(frozen=True)
class Layout:
    family: str  # for messages
    layers: str  # attribute of ``llm.get_decoder()`` holding the decoder layers (an nn.ModuleList)
    ffn: tuple[str, ...]  # modules of a layer making up its FFN, in order; only parameter-free elementwise ops
    #                       (the activation) run between two of them, so routing each one routes the whole FFN
    attention: str  # attribute of a layer holding its self-attention
    projections: tuple[str, ...]  # every parameterised module of the attention; all token-wise
    norms: tuple[str, ...]  # the layer's remaining parameterised modules (shared by text and image tokens)

    @property
    def ffn_is_one_module(self) -> bool:
        """The top-k router upcycles the FFN as one callable module: it needs this."""
        return len(self.ffn) == 1


_LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_LLAMA_NORMS = ("input_layernorm", "post_attention_layernorm")

LAYOUTS: dict[str, Layout] = {
    "llama": Layout("Llama", "layers", ("mlp",), "self_attn", _LLAMA_ATTENTION, _LLAMA_NORMS),
    "qwen2": Layout("Qwen2", "layers", ("mlp",), "self_attn", _LLAMA_ATTENTION, _LLAMA_NORMS),
    "mistral": Layout("Mistral", "layers", ("mlp",), "self_attn", _LLAMA_ATTENTION, _LLAMA_NORMS),
    "phi3": Layout("Phi-3", "layers", ("mlp",), "self_attn", ("qkv_proj", "o_proj"), _LLAMA_NORMS),
    "gpt2": Layout("GPT-2", "h", ("mlp",), "attn", ("c_attn", "c_proj"), ("ln_1", "ln_2")),
    "opt": Layout("OPT", "layers", ("fc1", "fc2"), "self_attn", ("q_proj", "k_proj", "v_proj", "out_proj"),
                  ("self_attn_layer_norm", "final_layer_norm")),
}


def layout_for(llm: nn.Module) -> Layout:
    """The declared layout of ``llm``'s family; MMError naming the family when there is none."""
    model_type = getattr(getattr(llm, "config", None), "model_type", None)
    if model_type not in LAYOUTS:
        raise MMError(f"modality experts: no layout is declared for LLM family {model_type!r} "
                      f"({type(llm).__name__}); declared: {', '.join(sorted(LAYOUTS))} (mm/moe/layouts.py)")
    return LAYOUTS[model_type]


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The decoder layers of ``llm``, where its layout says they are."""
    layout = layout_for(llm)
    layers = getattr(llm.get_decoder(), layout.layers, None)
    if not isinstance(layers, nn.ModuleList):
        raise MMError(f"modality experts: {layout.family} decoder {type(llm.get_decoder()).__name__} has no "
                      f"layer list .{layout.layers}")
    return layers


def _owners(module: nn.Module) -> set[str]:
    """Names of the direct children holding ``module``'s parameters ('' for parameters of its own)."""
    return {name.split(".")[0] if "." in name else "" for name, _ in module.named_parameters()}


def check_layer(layout: Layout, layer: nn.Module, index: int) -> None:
    """Refuse (one line) a layer that is not exactly what ``layout`` declares."""
    declared = {*layout.ffn, layout.attention, *layout.norms}
    missing = sorted(n for n in declared if not isinstance(getattr(layer, n, None), nn.Module))
    undeclared = sorted(_owners(layer) - declared)
    attention = getattr(layer, layout.attention, None)
    if attention is not None and not missing:
        missing += [f"{layout.attention}.{n}" for n in layout.projections
                    if not isinstance(getattr(attention, n, None), nn.Module)]
        undeclared += [f"{layout.attention}.{n or '<own parameters>'}"
                       for n in sorted(_owners(attention) - set(layout.projections))]
    if missing or undeclared:
        what = "; ".join(filter(None, [missing and f"missing {', '.join(missing)}",
                                       undeclared and f"undeclared parameterised parts {', '.join(undeclared)}"]))
        raise MMError(f"modality experts: {layout.family} decoder layer {index} ({type(layer).__name__}) does not "
                      f"match its declared layout ({what}); refusing to cover it partially")
