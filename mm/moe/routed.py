"""Routed forwards for an LLM's own token-wise modules (FFN, attention projections).

``attach_experts`` installs a routed forward as ``module.forward`` (an instance attribute, as accelerate's hooks
do; hooks on the module still run around it). The module itself stays where it is, with its own class, parameters and children: the LLM's module
tree, its state-dict names (``llm.model.layers.3.mlp.gate_proj.weight``) and ``llm.save_pretrained`` are exactly
those of the plain LLM. The experts are owned by ``model.moe`` (state-dict names ``moe.*``); the routed forward
holds plain references to them and to the module's original forward.

Each token passes through exactly one path: rows are gathered per path (``index_select``), run, and scattered
back (``index_copy_`` / ``index_add_``); nothing is computed densely and then masked.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def dispatch(x: torch.Tensor, routes: list[tuple[torch.Tensor, Callable]], every: bool = False) -> torch.Tensor:
    """Run each callable on its own rows of ``x`` ``[..., D]``, in order; ``routes`` = ``(flat row indices [n],
    fn)`` covering every row exactly once; ``every``: a route without rows runs too, on zero rows.
    Returns ``[..., Dout]``."""
    flat = x.reshape(-1, x.shape[-1])  # [N, D]
    outs = [(index, fn(flat.index_select(0, index))) for index, fn in routes if index.numel() or every]
    first = outs[0][1]
    out = first.new_empty(flat.shape[0], first.shape[-1])  # [N, Dout]
    for index, y in outs:
        out.index_copy_(0, index, y)
    return out.reshape(*x.shape[:-1], out.shape[-1])


class ModalityForward:
    """Image-token rows -> ``expert``; text rows -> the module's own forward (static modality routing).

    Which rows are image tokens is ``owner.split(x)`` (mm/moe/experts.py): None outside a routed call, for
    text-only inputs and for generated tokens, and then every row takes the text path. With ``owner.lockstep``
    (training) the expert and then the module's own path both run in every pass, a path without rows on zero
    rows, so that ZeRO-3 ranks call the same modules in the same order (``MultimodalModel.lockstep``).
    """

    def __init__(self, module: nn.Module, expert: nn.Module, owner, expert_name: str):
        self.text = module.forward  # the module's own (bound) forward, captured before routing replaces it
        self.expert = expert
        self.owner = owner  # the ModalityExperts holding the routing state
        self.expert_name = expert_name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., Dout]
        split = self.owner.split(x)
        every = self.owner.lockstep
        if split is None and every:
            rows = torch.arange(x.shape[:-1].numel(), device=x.device)  # every row is text
            split = (rows[:0], rows)
        if split is None:
            return self.text(x)
        image_rows, text_rows = split
        if not text_rows.numel() and not every:
            return self.expert(x)
        return dispatch(x, [(image_rows, self.expert), (text_rows, self.text)], every)

    def __repr__(self) -> str:
        return f"ModalityForward(image tokens -> {self.expert_name})"


class TopKForward:
    """Every token -> its ``top_k`` of ``experts`` (upcycled FFN copies) chosen by a learned ``router``, outputs
    mixed by the renormalised router probabilities (MoE-LLaVA style). The module's own FFN weights are not used.
    The load-balancing term of each call is handed to ``owner.record_balance``. With ``owner.lockstep``
    (training) an expert that no token chose runs on zero rows."""

    def __init__(self, router: nn.Linear, experts: nn.ModuleList, owner, top_k: int, expert_name: str):
        self.router = router
        self.experts = experts
        self.owner = owner
        self.top_k = top_k
        self.expert_name = expert_name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., D]
        flat = x.reshape(-1, x.shape[-1])  # [N, D]
        probs = self.router(flat).float().softmax(-1)  # [N, E]
        top_p, top_i = probs.topk(self.top_k, dim=-1)  # [N, k]
        gates = (top_p / top_p.sum(-1, keepdim=True)).to(x.dtype)  # [N, k]
        out = None
        for e, expert in enumerate(self.experts):
            rows, slot = (top_i == e).nonzero(as_tuple=True)  # tokens that chose expert e, and in which slot
            if not rows.numel() and not self.owner.lockstep:
                continue
            y = expert(flat.index_select(0, rows)) * gates[rows, slot].unsqueeze(-1)  # [n, D]
            out = torch.zeros(flat.shape[0], y.shape[-1], dtype=y.dtype, device=y.device) if out is None else out
            out.index_add_(0, rows, y)
        self.owner.record_balance(probs, top_i)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def __repr__(self) -> str:
        return f"TopKForward(top-{self.top_k} of {len(self.experts)} -> {self.expert_name})"


def balance_loss(probs: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor:
    """Switch / MoE-LLaVA load balancing ``E * sum_i f_i * P_i``: ``f_i`` the fraction of the ``N * k``
    assignments that went to expert ``i``, ``P_i`` its mean router probability. 1 under uniform routing."""
    num_experts = probs.shape[-1]
    counts = torch.bincount(top_i.flatten(), minlength=num_experts).to(probs.dtype)  # [E]
    fraction = counts / top_i.numel()  # f_i, no gradient (hard assignment)
    return num_experts * (fraction * probs.mean(0)).sum()
