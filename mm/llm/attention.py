"""Attention over packed rows: every document attends only to itself, with no ``[B, 1, T, T]`` mask.

A packed row holds several documents; its ``position_ids`` restart at 0 where each one begins (mm/data/pack.py),
and that is the only boundary information a packed batch carries. ``use_packed_attention(llm)`` picks the LLM's
attention implementation for packed rows once per model and device, checks it on a probe, and returns the one line
that states it. Candidates, first that keeps the probe's documents apart wins:

1. ``flash_attention_2`` (CUDA, flash-attn installed, bf16/fp16, the LLM supports it): flash varlen over the
   documents; ``document_kwargs`` passes ``cu_seq_lens`` (transformers only infers them for one row).
2. ``mm_packed_sdpa`` (registered here; the LLM supports SDPA): PyTorch SDPA once per document, causal, GQA native,
   sliding windows honoured. Rows whose documents average under ``DENSE_MEAN_DOCUMENT`` tokens (and at most
   ``DENSE_MAX_WIDTH`` wide) take one SDPA call with a dense document mask instead: there many tiny calls cost
   more than the small mask. Unpacked rows, padding masks and KV caches go to transformers' own SDPA.
3. The LLM's own implementation given ``position_ids`` only: transformers derives the document mask from them
   (dense for eager, e.g. Gemma-2, whose attention softcapping SDPA cannot do).

FlexAttention is not a candidate: torch 2.14 has no FlexAttention backward on CPU, and on CUDA flash varlen or
SDPA per document already skip the masked blocks. An LLM none of these keeps apart (an implementation that ignores
the document mask, or a model that takes positions from an ``attention_mask`` instead) is refused with one line.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward, use_gqa_in_sdpa
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from mm.errors import MMError

PACKED_SDPA = "mm_packed_sdpa"
DENSE_MEAN_DOCUMENT = 16  # tokens: below this mean document length a dense mask beats one SDPA call per document
DENSE_MAX_WIDTH = 512  # tokens: never build a dense [B, 1, T, T] mask for wider rows
FLASH = "flash_attention_2"


# ----- document boundaries ------------------------------------------------------------------------------------
def document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: True where a document begins (column 0, and wherever a position is not the previous + 1,
    the rule transformers uses for packed sequences)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def is_packed(position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None = None) -> bool:
    """A batch of packed rows: positions restart inside a row and no padding mask says otherwise."""
    if position_ids is None or attention_mask is not None or position_ids.dim() != 2:
        return False
    return bool(document_starts(position_ids)[:, 1:].any())


def document_lengths(position_ids: torch.Tensor | None, batch: int, width: int) -> list[list[int]]:
    """Lengths of the documents of each row (``[[width]] * batch`` without positions)."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[-1] != width:
        return [[width]] * batch
    starts = document_starts(position_ids.expand(batch, width))
    rows: list[list[int]] = [[] for _ in range(batch)]
    for b, t in starts.nonzero().tolist():
        rows[b].append(t)
    return [[end - start for start, end in zip(row, row[1:] + [width])] for row in rows]


def cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor:
    """int32 ``[N + 1]``: offsets of the N documents in the flattened ``B * T`` tokens (flash varlen's input)."""
    starts = document_starts(position_ids).flatten().nonzero().flatten()
    end = torch.tensor([position_ids.numel()], device=position_ids.device)
    return torch.cat([starts, end]).to(torch.int32)


def document_mask(rows: list[list[int]], width: int, window: int | None, device) -> torch.Tensor:
    """``[B, 1, T, T]`` bool, True = may attend: causal inside each document (and its sliding window)."""
    ids = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows]).to(device)
    at = torch.arange(width, device=device)
    allowed = (ids[:, :, None] == ids[:, None, :]) & (at[:, None] >= at[None, :])  # [B, T, T]
    if window is not None:
        allowed &= (at[:, None] - at[None, :]) < window
    return allowed[:, None]


# ----- mm_packed_sdpa -----------------------------------------------------------------------------------------
def _attend(q, k, v, scaling, dropout, window, gqa):
    """One document: q ``[H, n, Dh]``, k/v ``[Hkv, n, Dh]`` -> ``[H, n, Dh]``."""
    n = q.shape[1]
    mask = None
    if window is not None and n > window:
        at = torch.arange(n, device=q.device)
        mask = (at[:, None] >= at[None, :]) & ((at[:, None] - at[None, :]) < window)  # [n, n]
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, dropout_p=dropout,
                                         is_causal=mask is None, scale=scaling, enable_gqa=gqa)
    return out[0]


@torch.compiler.disable  # document lengths are data: compiled decoders run this part eagerly
def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                is_causal: bool | None = None, sliding_window: int | None = None, **kwargs):
    """An attention function for transformers' ``AttentionInterface``: q ``[B, H, T, Dh]``, k/v ``[B, Hkv, T, Dh]``
    -> (``[B, T, H, Dh]``, None). Causal attention inside each document of each row (documents from the
    ``position_ids`` the decoder layers pass along); anything else (padding masks, KV caches, bidirectional
    layers) is transformers' SDPA."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    B, H, T, _ = query.shape
    if attention_mask is not None or not causal or key.shape[2] != T or T == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    rows = document_lengths(kwargs.get("position_ids"), B, T)
    window = sliding_window if sliding_window is not None and sliding_window < T else None
    documents = sum(len(row) for row in rows)
    if documents > B and T <= DENSE_MAX_WIDTH and B * T < DENSE_MEAN_DOCUMENT * documents:
        mask = document_mask(rows, T, window, query.device)  # [B, 1, T, T]: many tiny documents, one masked call
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    gqa = key.shape[1] != H
    if gqa and not use_gqa_in_sdpa(None, key, value):  # as transformers' SDPA: native GQA where the kernels have it
        repeat = H // key.shape[1]
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
        gqa = False
    if documents == B and window is None:  # one document per row: plain causal attention
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True, scale=scaling,
                                             enable_gqa=gqa)
        return out.transpose(1, 2), None
    out = []
    for b, lengths in enumerate(rows):
        parts = zip(*(x[b].split(lengths, dim=1) for x in (query, key, value)))  # [H(kv), n, Dh] each
        out.append(torch.cat([_attend(q, k, v, scaling, dropout, window, gqa) for q, k, v in parts], dim=1))
    out = out[0][None] if B == 1 else torch.stack(out)  # [B, H, T, Dh]
    return out.transpose(1, 2), None  # [B, T, H, Dh]


def packed_sdpa_mask(**kwargs):
    """The mask transformers builds for ``mm_packed_sdpa``: none for rows without padding or cache (the attention
    function finds the documents itself), else exactly what SDPA gets."""
    offset = kwargs.get("q_offset", 0)
    plain = (kwargs.get("attention_mask") is None and not kwargs.get("use_vmap", False)
             and isinstance(offset, int) and offset == 0 and kwargs["q_length"] == kwargs["kv_length"])
    return None if plain else sdpa_mask(**kwargs)


AttentionInterface.register(PACKED_SDPA, packed_sdpa)
AttentionMaskInterface.register(PACKED_SDPA, packed_sdpa_mask)


# ----- choosing the path --------------------------------------------------------------------------------------
@dataclasses.dataclass
class PackedAttention:
    """What ``use_packed_attention`` chose for an LLM: the implementation, and whether the probe ran yet."""

    implementation: str
    line: str
    probed: bool


DESCRIPTIONS = {
    FLASH: "flash-attention varlen over the documents (cu_seqlens from position_ids)",
    PACKED_SDPA: "SDPA per document, no T x T mask",
}


def _base(llm):
    """The transformers model under a PEFT wrapper (or the LLM itself)."""
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


def document_kwargs(llm, position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> dict:
    """Extra decoder arguments for a batch: for packed rows, first make sure the LLM's attention path was chosen
    and probed (``use_packed_attention``, once per model); flash varlen then gets the documents' ``cu_seq_lens``
    (transformers infers them from positions only for a single row). Empty for unpacked batches."""
    if not is_packed(position_ids, attention_mask):
        return {}
    base = _base(llm)
    choice = getattr(base, "_mm_packed_attention", None)
    if choice is None or not choice.probed or choice.implementation != base.config._attn_implementation:
        # not chosen at train start, changed since, or flash (probed here, on its device)
        line = use_packed_attention(llm)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(line, flush=True)
    return _flash_kwargs(llm, position_ids)


def _flash_kwargs(llm, position_ids: torch.Tensor) -> dict:
    if _base(llm).config._attn_implementation != FLASH or not is_packed(position_ids):
        return {}
    cu = cu_seqlens(position_ids)
    longest = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def _hidden(llm, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states ``[B, T, D]``, the LLM run as the training forward runs it (decoder, no cache, the
    documents' kwargs)."""
    return llm.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                             **_flash_kwargs(llm, position_ids)).last_hidden_state.float()


def _probe_documents(llm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two packed rows ``[A | C]`` and ``[A' | C]`` ``[2, 44]`` with their positions, and ``C`` alone ``[1, 20]``
    with its positions; documents longer than ``DENSE_MEAN_DOCUMENT`` (the per-document path)."""
    device = next(llm.parameters()).device
    vocab = llm.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    a, a2, c = (torch.randint(1, vocab, (n,), generator=generator) for n in (24, 24, 20))
    rows = torch.stack([torch.cat([a, c]), torch.cat([a2, c])])
    positions = torch.cat([torch.arange(24), torch.arange(20)]).expand(2, -1)
    return rows.to(device), positions.to(device), c[None].to(device), torch.arange(20, device=device)[None]


def _run(llm, fn):
    """``fn()`` with ``llm`` in eval mode and no grad; each module's train/eval mode restored after."""
    modes = {module: module.training for module in llm.modules()}
    llm.eval()
    try:
        with torch.no_grad():
            return fn()
    finally:
        for module, training in modes.items():
            module.training = training


def alone(llm) -> torch.Tensor:
    """The probe's document ``C`` run alone: final hidden states ``[20, D]``."""
    _, _, single, single_positions = _probe_documents(llm)
    return _run(llm, lambda: _hidden(llm, single, single_positions)[0])


def probe(llm, reference: torch.Tensor) -> tuple[float, float]:
    """(leak, shift) of ``llm``'s current attention: how far the final hidden states of document ``C`` move when the
    document packed before it changes (leak), and between packed and ``reference`` (``alone`` under the LLM's
    original attention) or alone under this one (shift); both relative to the reference's mean magnitude, which
    outlier channels do not inflate."""
    rows, positions, single, single_positions = _probe_documents(llm)
    packed = _run(llm, lambda: _hidden(llm, rows, positions)[:, 24:])  # [2, 20, D]
    own = _run(llm, lambda: _hidden(llm, single, single_positions)[0])  # [20, D]
    scale = float(reference.abs().mean()) or 1.0
    leak = float((packed[0] - packed[1]).abs().max())
    shift = max(float((packed - reference).abs().max()), float((own - reference).abs().max()))
    return leak / scale, shift / scale


def _candidates(llm, device: str, half: bool) -> list[str]:
    base = _base(llm)
    found = []
    if device.startswith("cuda") and half and getattr(base, "_supports_flash_attn", False):
        from transformers.utils import is_flash_attn_2_available

        if is_flash_attn_2_available():
            found.append(FLASH)
    if getattr(base, "_supports_sdpa", False):
        found.append(PACKED_SDPA)
    original = base.config._attn_implementation
    return found + ([original] if original not in found else [])


def use_packed_attention(llm, device: str | None = None, half: bool | None = None) -> str:
    """Set the attention implementation ``llm`` runs packed rows with on ``device`` (default: where it is), check
    it on the probe, and return the line that states it. MMError if no candidate keeps documents apart."""
    base = _base(llm)
    here = next(llm.parameters()).device
    device = device or here.type
    half = (next(llm.parameters()).dtype in (torch.bfloat16, torch.float16)) if half is None else half
    original = base.config._attn_implementation
    # same shapes, same kernels: a kept-apart document does not move at all; packed vs alone differ by rounding
    leak_tolerance, shift_tolerance = (1e-3, 1e-3) if next(llm.parameters()).dtype == torch.float32 else (1e-2, 5e-2)
    reference = None
    tried = []
    for name in _candidates(llm, device, half):
        try:
            base.set_attn_implementation(name)
        except (ValueError, ImportError, RuntimeError) as exc:
            tried.append(f"{name}: {exc}".splitlines()[0])
            continue
        if base.config._attn_implementation != name:
            tried.append(f"{name}: cannot be set on {type(base).__name__}")
            continue
        describe = DESCRIPTIONS.get(name, f"{name} with the document mask transformers derives from position_ids")
        if name == FLASH and here.type != "cuda":  # flash runs on CUDA only: probed on the first packed batch
            base._mm_packed_attention = PackedAttention(name, f"attention: {name} ({describe}; "
                                                              f"{type(base).__name__} on {device})", probed=False)
            return base._mm_packed_attention.line
        try:
            if reference is None:
                base.set_attn_implementation(original)
                reference = alone(llm)
                base.set_attn_implementation(name)
            leak, shift = probe(llm, reference)
        except Exception as exc:  # noqa: BLE001  (an implementation that cannot run this model is not a candidate)
            tried.append(f"{name}: {type(exc).__name__}: {exc}".splitlines()[0])
            continue
        if leak <= leak_tolerance and shift <= shift_tolerance:
            line = f"attention: {name} ({describe}; {type(base).__name__} on {device})"
            base._mm_packed_attention = PackedAttention(name, line, probed=True)
            return line
        tried.append(f"{name}: a document's hidden states move by {max(leak, shift):.3g} of their size with "
                     f"what is packed before it")
    base.set_attn_implementation(original)
    raise MMError(f"packed rows need attention that keeps documents apart, and {type(base).__name__} has none "
                  f"here ({'; '.join(tried)}); train it with data.pack=false")
