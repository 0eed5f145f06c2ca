"""Routed stand-ins for an LLM's own token-wise modules (FFN, attention projections).

A routed module takes the place of the wrapped module inside the decoder layer and is *transparent*: it shares
the wrapped module's parameter, buffer and child dictionaries, so the LLM's state-dict names do not change
(``llm.model.layers.3.mlp.gate_proj.weight`` stays exactly that) and ``llm.save_pretrained`` still writes a
plain checkpoint. The experts are owned by ``model.moe`` and held here through a plain (unregistered)
reference, so they appear once in the state dict, under ``moe.*``.

Each token passes through exactly one path: rows are gathered per path (``index_select``), run, and scattered
back (``index_copy_`` / ``index_add_``); nothing is computed densely and then masked.
"""
from __future__ import annotations

import torch
from torch import nn


def dispatch(x: torch.Tensor, routes: list[tuple[torch.Tensor, nn.Module]]) -> torch.Tensor:
    """Run each module on its own rows of ``x`` ``[B, T, D]``; ``routes`` = ``(flat row indices [n], module)``
    covering every row exactly once. Returns ``[B, T, Dout]``."""
    flat = x.reshape(-1, x.shape[-1])  # [B*T, D]
    outs = [(index, module(flat.index_select(0, index))) for index, module in routes if index.numel()]
    first = outs[0][1]
    out = first.new_empty(flat.shape[0], first.shape[-1])  # [B*T, Dout]
    for index, y in outs:
        out.index_copy_(0, index, y)
    return out.reshape(*x.shape[:-1], out.shape[-1])


class _Transparent(nn.Module):
    """Base: adopt ``text``'s parameters, buffers and children as our own (same names, same tensors)."""

    def __init__(self, text: nn.Module):
        super().__init__()
        object.__setattr__(self, "text", text)  # not registered: its tensors are ours already
        object.__setattr__(self, "_parameters", text._parameters)
        object.__setattr__(self, "_buffers", text._buffers)
        object.__setattr__(self, "_non_persistent_buffers_set", text._non_persistent_buffers_set)
        object.__setattr__(self, "_modules", text._modules)
        self.training = text.training

    def train(self, mode: bool = True):
        super().train(mode)
        self.text.training = mode
        return self


class ModalityRouted(_Transparent):
    """Image-token rows -> ``expert``; text rows -> the LLM's own ``text`` module (static modality routing).

    Outside ``model.moe.route(mask)``, and in cached decoding steps, every row takes the text path.
    """

    def __init__(self, text: nn.Module, expert: nn.Module, owner: nn.Module, expert_name: str):
        super().__init__(text)
        object.__setattr__(self, "_expert", expert)
        object.__setattr__(self, "_owner", owner)  # the ModalityExperts holding the routing state
        self.expert_name = expert_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, Dout]
        split = self._owner.split(x)
        if split is None:
            return self.text(x)
        image_rows, text_rows = split
        if not text_rows.numel():
            return self._expert(x)
        return dispatch(x, [(image_rows, self._expert), (text_rows, self.text)])

    def extra_repr(self) -> str:
        return f"image tokens -> {self.expert_name}"


class TopKRouted(_Transparent):
    """Every token -> its ``top_k`` of ``experts`` (upcycled FFN copies) chosen by a learned ``router``, outputs
    mixed by the renormalised router probabilities (MoE-LLaVA style). The wrapped FFN itself is not used.
    The load-balancing term of each forward is handed to ``owner.record_balance``."""

    def __init__(self, text: nn.Module, router: nn.Linear, experts: nn.ModuleList, owner: nn.Module, top_k: int,
                 expert_name: str):
        super().__init__(text)
        object.__setattr__(self, "_router", router)
        object.__setattr__(self, "_experts", experts)
        object.__setattr__(self, "_owner", owner)
        self.top_k = top_k
        self.expert_name = expert_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        flat = x.reshape(-1, x.shape[-1])  # [N, D]
        probs = self._router(flat).float().softmax(-1)  # [N, E]
        top_p, top_i = probs.topk(self.top_k, dim=-1)  # [N, k]
        gates = (top_p / top_p.sum(-1, keepdim=True)).to(x.dtype)  # [N, k]
        out = None
        for e, expert in enumerate(self._experts):
            rows, slot = (top_i == e).nonzero(as_tuple=True)  # tokens that chose expert e, and in which slot
            if not rows.numel():
                continue
            y = expert(flat.index_select(0, rows)) * gates[rows, slot].unsqueeze(-1)  # [n, D]
            out = torch.zeros(flat.shape[0], y.shape[-1], dtype=y.dtype, device=y.device) if out is None else out
            out.index_add_(0, rows, y)
        self._owner.record_balance(probs, top_i)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def extra_repr(self) -> str:
        return f"top-{self.top_k} of {len(self._experts)} -> {self.expert_name}"


def balance_loss(probs: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor:
    """Switch / MoE-LLaVA load balancing ``E * sum_i f_i * P_i``: ``f_i`` the fraction of the ``N * k``
    assignments that went to expert ``i``, ``P_i`` its mean router probability. 1 under uniform routing."""
    num_experts = probs.shape[-1]
    counts = torch.bincount(top_i.flatten(), minlength=num_experts).to(probs.dtype)  # [E]
    fraction = counts / top_i.numel()  # f_i, no gradient (hard assignment)
    return num_experts * (fraction * probs.mean(0)).sum()
