"""Modality experts inside a frozen LLM (Mono-InternVL): visual FFN / attention experts, learned top-k option."""
from mm.moe.attach import attach_experts, chosen_layers, decoder_layers
from mm.moe.experts import ModalityExperts
from mm.moe.routed import ModalityRouted, TopKRouted, balance_loss

__all__ = ["attach_experts", "chosen_layers", "decoder_layers", "ModalityExperts", "ModalityRouted", "TopKRouted",
           "balance_loss"]
