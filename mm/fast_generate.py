"""Fast greedy decoding for MultimodalModel: images encoded once, a static KV cache, a lean decode loop.

``generate`` pays a fixed cost per token (logits processors, stopping criteria, cache bookkeeping, a dynamic
cache that grows by concatenation). For greedy decoding none of that is needed: this loop prefills once with
``logits_to_keep=1``, then feeds one token at a time into a preallocated static KV cache with a fixed-shape
attention mask, so the one-token step has static shapes and can be compiled (``compile=True``: torch.compile of the
image encoding, the prefill (dynamic length) and the step, CUDA graphs for the step on a GPU; needs a C++ compiler
on CPU; the first calls pay the compilation, about a minute on 2 CPU cores). Every use of transformers' cache
internals goes through ``mm.llm.kv_cache``, which names the supported transformers versions; with any other,
``greedy_options`` says no and callers decode with ``generate``.

Prefix reuse: the key/values of the longest shared text prefix of the prompt (the chat template's system prompt
and turn header, the tokens before the first image) are kept after a call, in ``decoder(model)`` (state owned by
this module, never set on the model); a later prompt that starts with the same token ids copies them into its cache
and prefills only the rest (exact: each key/value depends only on the tokens before it). Used for unpadded batches
without modality experts; the entry is dropped when any LLM weight changes (tensor version counters), the dtype or
the device.

Greedy output equals ``llm.generate(do_sample=False)`` token for token (tests/test_fast_generate.py).
Sampling, beams and multiple return sequences are not handled here: callers use ``generate`` for those.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Any

import torch

from mm.llm import kv_cache

MIN_PREFIX = 2  # a shorter shared prefix is not worth a separate prefill call on a miss


def _encode(model, pixel_values):  # [I, 3, H, W] -> image features
    return model.encode_images(pixel_values)


def _prefill(model, embeddings, mask, positions, cache):  # [B, T, D], [B, S'], [B, T] -> [B] next tokens
    logits = kv_cache.forward(model.llm, cache, inputs_embeds=embeddings, attention_mask=mask,
                              position_ids=positions, logits_to_keep=1).logits  # [B, 1, V]
    return logits[:, -1].argmax(-1)


def _step(model, tokens, positions, mask, cache):  # [B, 1], [B, 1], [B, S] -> [B] next tokens
    logits = kv_cache.forward(model.llm, cache, input_ids=tokens, position_ids=positions,
                              attention_mask=mask).logits  # [B, 1, V]
    return logits[:, -1].argmax(-1)


class _Runner:
    """The three calls of greedy decoding: image encoding, the prompt's prefill (any length) and the one-token
    step (static shapes), each taking the model as its first argument (the runner keeps no reference to it).
    With ``compile``, each is a torch.compile'd function, compiled on first use; on a GPU the step also runs as a
    CUDA graph. Parameters are graph inputs, so weights changed in place after compilation are seen."""

    def __init__(self, compile: bool, cuda: bool):
        self.compiled = compile
        self.graphs = compile and cuda
        if compile:  # first shapes compile static; a second batch size or length recompiles with dynamic sizes
            self.encode = torch.compile(_encode)
            self.prefill = torch.compile(_prefill, dynamic=True)
            self.step_fn = torch.compile(_step, mode="reduce-overhead" if self.graphs else None)
        else:
            self.encode, self.prefill, self.step_fn = _encode, _prefill, _step

    def step(self, model, tokens, positions, mask, cache, repeat: bool = False):
        """``repeat``: same shapes, dtypes and cache as the previous call (a later step of one generation), so the
        compiled graph's guards need no checking (saves ~2 ms per token on 2 CPU cores)."""
        stance = (torch.compiler.set_stance("default", skip_guard_eval_unsafe=True) if self.compiled and repeat
                  else contextlib.nullcontext())
        with stance:
            if not self.graphs:
                return self.step_fn(model, tokens, positions, mask, cache)
            torch.compiler.cudagraph_mark_step_begin()
            return self.step_fn(model, tokens, positions, mask, cache).clone()  # the graph's output buffer is reused


class _PrefixEntry:
    """Key/values ``[1, H, P, d]`` per layer of the token ids ``ids`` (length P), for the weights ``fingerprint``."""

    def __init__(self, ids: list[int], kv: kv_cache.KV, fingerprint):
        self.ids, self.kv, self.fingerprint = ids, kv, fingerprint


class FastDecoder:
    """What greedy decoding keeps for one model between calls: its runners (eager, compiled; compiled graphs are
    kept, the minute of compilation is paid once) and the key/values of the last shared text prefix.

    Owned by this module, in a table keyed weakly by the model (``decoder(model)``): nothing is set on the model,
    so nothing reaches its ``state_dict`` or its deep copies, and the entry goes with the model. The prefix entry
    is checked against a fingerprint of the LLM's weights on every use (see ``_fingerprint``)."""

    def __init__(self):
        self.runners: dict[tuple[bool, bool], _Runner] = {}
        self.prefix: _PrefixEntry | None = None

    def runner(self, compile: bool, cuda: bool) -> _Runner:
        if (compile, cuda) not in self.runners:
            self.runners[compile, cuda] = _Runner(compile, cuda)
        return self.runners[compile, cuda]


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> FastDecoder


def decoder(model) -> FastDecoder:
    """``model``'s decoding state, created on first use and dropped with the model."""
    if model not in _DECODERS:
        _DECODERS[model] = FastDecoder()
    return _DECODERS[model]


def _fingerprint(llm):
    """Changes when the LLM or any weight is replaced or modified in place (optimizer steps bump tensor versions),
    or moved to another dtype or device."""
    return (id(llm),) + tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in llm.parameters())


def _shared_prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int | None) -> int:
    """Length of the text prefix common to all rows, before any image placeholder, leaving at least one token to
    prefill; 0 for padded batches (their rows start at different positions)."""
    if not bool(attention_mask.all()):
        return 0
    stop = (input_ids != input_ids[:1]).any(0)  # [T] columns where rows differ
    if image_token_id is not None:
        stop = stop | (input_ids == image_token_id).any(0)
    shared = int(stop.int().argmax()) if bool(stop.any()) else input_ids.shape[1]
    return min(shared, input_ids.shape[1] - 1)


def _common_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@torch.no_grad()
def greedy_generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    max_new_tokens: int = 64,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    streamer=None,
    compile: bool = False,
    reuse_prefix: bool = True,
    stopping_criteria=None,
    image_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy continuation of left-padded ``input_ids`` ``[B, T]`` (placeholders expanded). Returns the new
    tokens ``[B, N]`` (N <= max_new_tokens; rows that finished early are filled with ``pad_token_id``),
    as ``llm.generate`` does when given ``inputs_embeds``. ``reuse_prefix``: keep and reuse the key/values of
    the shared text prefix across calls (see the module docstring). ``stopping_criteria``: a transformers
    ``StoppingCriteriaList`` (or any callable ``(new_tokens [B, n], scores) -> [B] bool``); the call ends when
    every row is done; as in ``generate``, a done row is filled with ``pad_token_id`` only when ``eos_token_id``
    is given. ``image_index``: as in ``model.embed`` (a layout that rearranges image features)."""
    kv_cache.check()
    llm = model.llm
    batch, length = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    eos = torch.tensor([] if eos_token_id is None else
                       ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)), device=input_ids.device)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    total = length + max_new_tokens
    mask = torch.cat([attention_mask, attention_mask.new_ones(batch, max_new_tokens)], dim=1)  # [B, S] fixed
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, T], left padding aware
    cache = kv_cache.new_static_cache(llm, total)
    state = decoder(model)
    runner = state.runner(compile and model.moe is None, next(llm.parameters()).is_cuda)
    features = runner.encode(model, pixel_values) if pixel_values is not None and len(pixel_values) else None
    embeddings = model.embed(input_ids, image_features=features, image_index=image_index)  # images encoded once
    shared = 0
    if reuse_prefix and model.moe is None and kv_cache.is_plain_static(cache):
        shared = _shared_prefix(input_ids, attention_mask, model.image_token_id)
    start = 0  # tokens whose key/values come from the prefix entry
    if shared >= MIN_PREFIX:
        prefix_ids = input_ids[0, :shared].tolist()
        fingerprint = _fingerprint(llm)
        entry = state.prefix
        if entry is not None and entry.fingerprint == fingerprint:
            start = _common_length(entry.ids, prefix_ids)
            if start:
                kv_cache.restore(cache, entry.kv, start, batch)
        if start < shared:  # prefill up to the end of the shared prefix and keep it for later calls
            kv_cache.forward(llm, cache, inputs_embeds=embeddings[:, start:shared], attention_mask=mask[:, :shared],
                             position_ids=positions[:, start:shared], logits_to_keep=1)
            state.prefix = _PrefixEntry(prefix_ids, kv_cache.snapshot(cache, shared), fingerprint)
            start = shared
    out = []
    if streamer is not None:  # as generate does with inputs_embeds: an empty prompt first (skip_prompt eats it)
        streamer.put(input_ids.new_empty(batch, 0).cpu())
    with model.routing(input_ids == model.image_token_id):  # first pass: the prompt; later passes are text
        token = runner.prefill(model, embeddings[:, start:], mask[:, :length], positions[:, start:], cache)  # [B]
        done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        position = positions[:, -1:]  # [B, 1]
        for step in range(max_new_tokens):
            if len(eos):  # as generate: finished rows are padded only when an end-of-sequence id is given
                token = torch.where(done, torch.full_like(token, pad), token)
            out.append(token)
            if streamer is not None:
                streamer.put(token.cpu())
            if len(eos):
                done = done | torch.isin(token, eos)
            if stopping_criteria is not None:  # as generate: sees the new tokens so far, returns [B] done
                done = done | stopping_criteria(torch.stack(out, dim=1), None).to(done.device)
            if (len(eos) or stopping_criteria is not None) and bool(done.all()):
                break
            if step == max_new_tokens - 1:
                break
            position = position + 1
            token = runner.step(model, token[:, None], position, mask, cache, repeat=step > 0)
    if streamer is not None:
        streamer.end()
    return torch.stack(out, dim=1)  # [B, N]


def greedy_options(generation: dict[str, Any]) -> bool:
    """True when ``generate_batch``'s keywords ask for plain greedy decoding (what ``greedy_generate`` does) and
    the installed transformers supports it (``kv_cache.supported()``; otherwise a warning, once, and False, so
    callers fall back to ``generate``)."""
    known = {"max_new_tokens", "temperature", "top_p", "num_beams", "num_return_sequences", "do_sample",
             "stopping_criteria"}
    if set(generation) - known:
        return False
    greedy = (not generation.get("temperature") and generation.get("num_beams", 1) == 1
              and generation.get("num_return_sequences", 1) == 1 and not generation.get("do_sample"))
    if greedy and not kv_cache.supported():
        warnings.warn(f"{kv_cache.problem()}: decoding with transformers' generate instead", stacklevel=2)
        return False
    return greedy
