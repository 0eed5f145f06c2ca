"""Modality experts inside a frozen LLM (Mono-InternVL): visual FFN / attention experts, learned top-k option."""
from mm.moe.attach import attach_experts, chosen_layers
from mm.moe.experts import ModalityExperts
from mm.moe.layouts import LAYOUTS, Layout, decoder_layers, layout_for
from mm.moe.routed import ModalityForward, TopKForward, balance_loss

__all__ = ["attach_experts", "chosen_layers", "decoder_layers", "LAYOUTS", "Layout", "layout_for",
           "ModalityExperts", "ModalityForward", "TopKForward", "balance_loss"]
