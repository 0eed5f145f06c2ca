"""``ModalityExperts``: owns every expert parameter and the routing state that the routed layers read.

Parameter names (what stage globs select): ``moe.ffn_experts.<layer>.*`` (modality router: one visual FFN
per layer; top-k router: ``moe.ffn_experts.<layer>.<expert>.*``), ``moe.attn_experts.<layer>.<proj>.*``
and ``moe.router.<layer>.weight``.

Routing state: ``route(image_mask)`` is a context manager set around one forward or one ``generate`` call.
Inside it the *first* pass of the LLM (a plain forward, or generate's prefill) sends image positions to the
visual experts; the LLM's later passes in the same context are decoding steps: with the KV cache they hold
only generated (text) tokens, which take the text path; without it they re-run the prompt (routed by the mask)
plus generated text. Passes are counted by a forward pre-hook on the LLM, so a one-token prompt is no special
case. Gradient-checkpointing recomputation, which runs during
``backward`` after the context has closed, reuses the mask of the last routed forward.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from mm.config import MoEConfig
from mm.errors import MMError
from mm.moe.routed import balance_loss


class ModalityExperts(nn.Module):
    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.ffn_experts = nn.ModuleDict()  # "<layer>" -> FFN copy (modality) or ModuleList of N copies (topk)
        self.attn_experts = nn.ModuleDict()  # "<layer>" -> ModuleDict of projection copies
        self.router = nn.ModuleDict()  # "<layer>" -> Linear(D, N, bias=False), topk only
        self._mask: torch.Tensor | None = None  # [B, T] bool, set by route()
        self._last_mask: torch.Tensor | None = None  # for checkpoint recomputation during backward
        self._passes = 0  # LLM forward passes inside the current route() context
        self._split_cache: tuple | None = None
        self._balance: list[torch.Tensor] = []

    # ----- routing state ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def route(self, image_mask: torch.Tensor | None):
        """Within this context the LLM's first pass routes positions where ``image_mask`` ``[B, T]`` is True
        to the visual experts. Also starts a fresh collection of load-balancing terms."""
        saved = (self._mask, self._passes, self._split_cache)
        mask = None if image_mask is None else image_mask.bool()
        self._mask, self._passes, self._split_cache, self._balance = mask, 0, None, []
        self._last_mask = mask
        try:
            yield self
        finally:
            self._mask, self._passes, self._split_cache = saved

    def start_pass(self, module: nn.Module, args) -> None:
        """Forward pre-hook on the LLM: count its passes inside the current context."""
        if self._mask is not None:
            self._passes += 1
            self._split_cache = None

    def image_mask_for(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The ``[B, L]`` image mask that applies to ``hidden`` ``[B, L, D]`` now, or None (all text).

        First pass: ``L`` must equal the mask's length ``T``. Later passes of the same ``generate``: with the KV
        cache they cover only new (generated, text) tokens, ``L <= T`` -> None; without the cache they re-run
        the whole sequence, ``L > T`` -> the mask padded with text for the generated positions.
        """
        mask = self._mask
        if mask is None:
            if self._last_mask is None or torch._C._current_graph_task_id() == -1:
                return None
            mask = self._last_mask  # recomputation of a checkpointed layer inside backward
        elif self._passes > 1:
            if hidden.shape[1] <= mask.shape[1]:
                return None  # cached decoding: generated tokens are text
            mask = F.pad(mask, (0, hidden.shape[1] - mask.shape[1]), value=False)
        batch, length = hidden.shape[:2]
        if mask.shape[1] != length or batch % mask.shape[0]:
            raise MMError(f"modality mask of shape {tuple(mask.shape)} does not fit hidden states of shape "
                          f"{tuple(hidden.shape[:2])}")
        if batch != mask.shape[0]:  # generate expanded the batch for beams / several return sequences
            mask = mask.repeat_interleave(batch // mask.shape[0], dim=0)
        return mask

    def split(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(image rows, text rows)`` flat indices into ``hidden.reshape(-1, D)``, or None when no row is an
        image token. Computed once per pass and shape (one host sync per forward, not per layer)."""
        mask = self.image_mask_for(hidden)
        if mask is None:
            return None
        key = (tuple(hidden.shape[:2]), hidden.device)
        if self._split_cache is None or self._split_cache[0] != key:
            flat = mask.to(hidden.device).flatten()
            split = None
            if bool(flat.any()):
                split = (flat.nonzero().squeeze(1), (~flat).nonzero().squeeze(1))
            self._split_cache = (key, split)
        return self._split_cache[1]

    # ----- auxiliary loss ---------------------------------------------------------------------------------
    def record_balance(self, probs: torch.Tensor, top_i: torch.Tensor) -> None:
        self._balance.append(balance_loss(probs, top_i))

    def balance_loss(self) -> torch.Tensor:
        """Mean over routed layers of ``N * sum_i f_i * P_i`` from the last routed forward (1 = uniform);
        0 without a top-k router."""
        if not self._balance:
            return torch.zeros((), device=self._device())
        return torch.stack(self._balance).mean()

    def aux_loss(self) -> torch.Tensor:
        """What the trainer adds to its loss: ``config.aux_loss_coef * balance_loss()`` (0 for modality routing)."""
        return self.config.aux_loss_coef * self.balance_loss()

    def _device(self) -> torch.device:
        for parameter in self.parameters():
            return parameter.device
        return torch.device("cpu")

    def extra_repr(self) -> str:
        c = self.config
        return f"router={c.router}, layers={c.layers}, ffn_experts={c.ffn_experts}, attn_experts={c.attn_experts}"
