"""``ModalityExperts``: owns every expert parameter and the routing state that the routed forwards read.

Parameter names (what stage globs select): ``moe.ffn_experts.<layer>.*`` (modality router: one visual FFN
per layer, a copy of the layer's FFN module, or for a layout whose FFN is several modules, e.g. OPT,
``moe.ffn_experts.<layer>.<module>.*``; top-k router: ``moe.ffn_experts.<layer>.<expert>.*``),
``moe.attn_experts.<layer>.<proj>.*`` and ``moe.router.<layer>.weight``.

Routing state, in two steps, with no pass counting:

1. The call. ``route(image_mask)`` is a context manager that ``MultimodalModel`` opens around exactly one
   forward or ``generate`` call. It holds the call's image mask ``[B, T]`` (over the call's whole input
   sequence) and restores the previous state on exit.
2. The pass. A forward pre-hook on the LLM's decoder (``begin_pass``) runs at the start of every decoder pass
   and fixes that pass's routing from three facts of the pass itself: its input shape ``[B', L]`` and the
   length ``P`` of its KV cache before it. The pass holds positions ``P .. P+L-1`` of the sequence: image
   tokens where the call's mask says so, text beyond ``T`` (generated tokens). That one rule covers prefill
   (``P = 0, L = T``), cached decoding (``P >= T``: all text, also for a one-token prompt), decoding without a
   cache (``P = 0, L > T``: the mask padded with text), a cache prefilled with part of the prompt (``P > 0``)
   and beams / several return sequences (``B' = k * B``: each row's mask repeated ``k`` times). A pass outside
   a call is plain text: ``model.llm(...)`` called directly runs the plain LLM.

Gradient checkpointing recomputes layers inside ``backward``, after the call has closed and without a new
decoder pass, so the routed forwards reuse the routing of the last pass: the forward being differentiated.
That holds when each backward follows its own forward (the training loop). With checkpointing on, do not run
another forward of the same LLM between a forward and its backward: that pass would re-route the
recomputation (tests/moe/test_training.py shows both).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from mm.config import MoEConfig
from mm.errors import MMError
from mm.moe.routed import balance_loss


class _Pass:
    """The routing of one decoder pass: ``image`` ``[B', L]`` bool over its rows; split indices on first use."""

    def __init__(self, image: torch.Tensor):
        self.image = image
        self._split: dict[torch.device, tuple[torch.Tensor, torch.Tensor] | None] = {}

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if x.shape[:-1].numel() != self.image.numel():
            raise MMError(f"modality mask of this pass {tuple(self.image.shape)} does not fit hidden states of "
                          f"shape {tuple(x.shape)}")
        if x.device not in self._split:  # one host sync per pass and device, not per layer
            flat = self.image.to(x.device).flatten()  # [B' * L], the order of x.reshape(-1, D)
            self._split[x.device] = ((flat.nonzero().squeeze(1), (~flat).nonzero().squeeze(1))
                                     if bool(flat.any()) else None)
        return self._split[x.device]


class ModalityExperts(nn.Module):
    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.ffn_experts = nn.ModuleDict()  # "<layer>" -> FFN copy (modality) or ModuleList of N copies (topk)
        self.attn_experts = nn.ModuleDict()  # "<layer>" -> ModuleDict of projection copies
        self.router = nn.ModuleDict()  # "<layer>" -> Linear(D, N, bias=False), topk only
        self._mask: torch.Tensor | None = None  # [B, T] bool: the current call's image positions
        self._pass: _Pass | None = None  # the routing of the decoder's current (or last) pass
        self._balance: list[torch.Tensor] = []
        self.lockstep = False  # run every expert in every pass (set through MultimodalModel.lockstep)

    # ----- routing state ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def route(self, image_mask: torch.Tensor | None):
        """For one call (forward / generate) of the LLM: positions where ``image_mask`` ``[B, T]`` is True are
        image tokens and go to the visual experts."""
        saved = self._mask
        self._mask = None if image_mask is None else image_mask.bool()
        try:
            yield self
        finally:
            self._mask = saved

    def begin_pass(self, decoder: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook (with kwargs) on the LLM's decoder: fix the routing of the pass that starts now, and
        start a fresh collection of load-balancing terms."""
        self._balance = []
        self._pass = None if self._mask is None else self._routing(args, kwargs)

    def _routing(self, args: tuple, kwargs: dict) -> _Pass | None:
        inputs = kwargs.get("inputs_embeds")
        if inputs is None:
            inputs = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(inputs, torch.Tensor):
            raise MMError("modality experts: the decoder was called without input_ids or inputs_embeds")
        batch, length = inputs.shape[:2]
        mask = self._mask  # [B, T]
        if batch % mask.shape[0]:
            raise MMError(f"modality mask of shape {tuple(mask.shape)} does not fit a decoder pass over "
                          f"{batch} rows of {length} tokens")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        start = 0 if cache is None else int(cache.get_seq_length())  # positions already in the KV cache
        if start >= mask.shape[1]:
            return None  # cached decoding: only generated tokens, which are text
        window = mask[:, start:start + length]  # [B, <=L] this pass's positions; past T: generated text
        window = F.pad(window, (0, length - window.shape[1]), value=False)  # [B, L]
        if batch != mask.shape[0]:  # generate expanded the batch for beams / several return sequences
            window = window.repeat_interleave(batch // mask.shape[0], dim=0)  # [B', L]
        return _Pass(window)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(image rows, text rows)``: flat indices into ``x.reshape(-1, D)`` (``x`` ``[B', L, D]`` or
        ``[B' * L, D]``: the current pass's tokens), or None when no row is an image token."""
        return None if self._pass is None else self._pass.split(x)

    # ----- auxiliary loss ---------------------------------------------------------------------------------
    def record_balance(self, probs: torch.Tensor, top_i: torch.Tensor) -> None:
        self._balance.append(balance_loss(probs, top_i))

    def balance_loss(self) -> torch.Tensor:
        """Mean over routed layers of ``N * sum_i f_i * P_i`` from the last decoder pass (1 = uniform);
        0 without a top-k router."""
        if not self._balance:
            return torch.zeros((), device=self._device())
        return torch.stack(self._balance).mean()

    def aux_loss(self) -> torch.Tensor | None:
        """What the trainer adds to its loss: the router's ``aux_loss_coef * balance_loss()``; None for a router
        without a balance loss (modality routing)."""
        coef = getattr(self.config.router.options, "aux_loss_coef", None)
        return None if coef is None else coef * self.balance_loss()

    def _device(self) -> torch.device:
        for parameter in self.parameters():
            return parameter.device
        return torch.device("cpu")

    def extra_repr(self) -> str:
        c = self.config
        return f"router={c.router.name}, layers={c.layers}, ffn_experts={c.ffn_experts}, attn_experts={c.attn_experts}"
