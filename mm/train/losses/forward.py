"""The shared forward pass of every loss: final hidden states, then the LM head only where it is needed.

Computing logits only at labelled positions (instead of ``[B, T, V]``) is the main speed and memory win of
training: the vocabulary projection of a 135M-parameter LLM costs as much as several decoder layers.

Packed rows carry no attention mask, only ``position_ids`` restarting at 0 per document: the LLM's attention
implementation keeps the documents apart (mm/llm/attention.py, chosen and probed once per model).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mm.llm.attention import document_kwargs
from mm.prompt import IGNORE


def hidden_states(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final decoder hidden states ``[B, T, D]`` (no LM head) for a contract batch."""
    input_ids = batch["input_ids"]
    attention_mask, position_ids = batch.get("attention_mask"), batch.get("position_ids")
    documents = document_kwargs(model.llm, position_ids, attention_mask)  # {} unless flash varlen on packed rows
    embeddings = model.embed(input_ids, batch.get("pixel_values"), image_index=batch.get("image_index"))  # [B, T, D]
    decoder = model.llm.get_decoder()
    with model.routing(input_ids == model.image_token_id):
        out = decoder(
            inputs_embeds=embeddings,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **documents,
        )
    return out.last_hidden_state


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: positions whose hidden state predicts a labelled next token."""
    positions = torch.zeros_like(labels, dtype=torch.bool)
    positions[:, :-1] = labels[:, 1:] != IGNORE
    return positions


def logits_at(model, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """LM-head logits ``[N, V]`` (float32) at the ``positions`` ``[B, T]`` of ``hidden`` ``[B, T, D]``."""
    return model.llm.get_output_embeddings()(hidden[positions]).float()


def targets_at(labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Next-token targets ``[N]`` for ``positions`` (from ``label_positions``)."""
    shifted = torch.full_like(labels, IGNORE)
    shifted[:, :-1] = labels[:, 1:]
    return shifted[positions]


def token_logps(model, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities ``[N]`` of each labelled token and the row ``[N]`` it belongs to."""
    positions = label_positions(labels)
    logits = logits_at(model, hidden, positions)  # [N, V]
    targets = targets_at(labels, positions)  # [N]
    logps = -F.cross_entropy(logits, targets, reduction="none")  # [N]
    rows = positions.nonzero()[:, 0]  # [N]
    return logps, rows


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs ``[B]`` and labelled-token counts ``[B]`` of an unpacked batch."""
    hidden = hidden_states(model, batch)
    logps, rows = token_logps(model, hidden, batch["labels"])
    B = batch["labels"].shape[0]
    total = torch.zeros(B, dtype=logps.dtype, device=logps.device).index_add(0, rows, logps)  # [B]
    count = torch.zeros(B, dtype=torch.long, device=logps.device).index_add(0, rows, torch.ones_like(rows))
    return total, count
