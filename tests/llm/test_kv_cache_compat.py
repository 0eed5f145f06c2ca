"""The transformers internals that mm.llm.kv_cache relies on hold for the installed transformers, on every tiny
LLM family; each failure names the installed version and the supported range. An unsupported version makes fast
decoding refuse with one clear line while generate_batch still answers."""
import contextlib
from pathlib import Path

import pytest
import torch
import transformers

from mm.errors import MMError
from mm.llm import kv_cache
from mm.llm.tiny import build_tiny

FAMILIES = ("llama", "qwen2", "mistral", "phi3", "gpt2", "opt")  # the tiny-* LLMs of mm.llm.tiny
WHERE = (f"transformers {transformers.__version__} is installed; "
         f"mm.llm.kv_cache supports transformers{kv_cache.SUPPORTED}")


@contextlib.contextmanager
def internals():
    """Any failure inside names the installed transformers and the supported range."""
    try:
        yield
    except Exception as exc:
        raise AssertionError(f"{WHERE}; its cache internals changed: {type(exc).__name__}: {exc}") from exc


def batch():
    """Two left-padded rows: ids, mask and positions ``[2, 5]`` (row 0 starts two tokens late)."""
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def test_installed_transformers_is_supported():
    assert kv_cache.problem() is None, kv_cache.problem()


def test_supported_range_is_the_pyproject_pin():
    text = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    pins = [line.strip().strip('",') for line in text.splitlines() if line.strip().startswith('"transformers')]
    assert pins == [f"transformers{kv_cache.SUPPORTED}"], (pins, kv_cache.SUPPORTED)


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_static_cache_decoding_equals_full_forward(family):
    """Prefill then one step with the fixed ``[B, max_len]`` mask: the cache writes at its own counter while the
    positions follow the left padding, and its logits equal a forward over the whole sequence without a cache."""
    llm = build_tiny(family)[0].eval()  # no dropout
    ids, mask, positions = batch()
    max_len = 8
    with internals():
        cache = kv_cache.new_static_cache(llm, max_len)
        kv_cache.forward(llm, cache, input_ids=ids, attention_mask=mask, position_ids=positions)
        for layer in cache.layers:
            assert layer.keys.shape[0] == 2 and layer.keys.shape[2] == max_len, "StaticLayer.keys [B, H, S, d]"
            assert int(layer.cumulative_length.reshape(-1)[0]) == 5, "StaticLayer.cumulative_length"
        token = torch.tensor([[20], [21]])
        fixed = torch.cat([mask, mask.new_ones(2, max_len - 5)], dim=1)  # [B, max_len]
        step = kv_cache.forward(llm, cache, input_ids=token, attention_mask=fixed, position_ids=positions[:, -1:] + 1)
        full = llm(input_ids=torch.cat([ids, token], 1), attention_mask=fixed[:, :6],
                   position_ids=torch.cat([positions, positions[:, -1:] + 1], 1), use_cache=False)
        torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1])


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_snapshot_restore_continues_exactly(family):
    """Key/values of a prefix copied into an empty cache continue as if the prefix had been prefilled there."""
    llm = build_tiny(family)[0].eval()  # no dropout
    ids = torch.tensor([[5, 6, 7, 8, 9]]).expand(2, -1)
    positions = torch.arange(5).expand(2, -1)
    mask = torch.ones(2, 8, dtype=torch.long)
    with internals():
        whole = kv_cache.new_static_cache(llm, 8)
        expected = kv_cache.forward(llm, whole, input_ids=ids, attention_mask=mask[:, :5], position_ids=positions)
        if not kv_cache.is_plain_static(whole):  # sliding-window layers: fast decoding does not reuse prefixes
            return
        source = kv_cache.new_static_cache(llm, 8)
        kv_cache.forward(llm, source, input_ids=ids[:1, :3], attention_mask=mask[:1, :3],
                         position_ids=positions[:1, :3])
        kv = kv_cache.snapshot(source, 3)
        assert all(k.shape[:3] == v.shape[:3] == (1, k.shape[1], 3) for k, v in kv), "snapshot [1, H, P, d]"
        restored = kv_cache.new_static_cache(llm, 8)
        kv_cache.restore(restored, kv, 3, batch=2)
        rest = kv_cache.forward(llm, restored, input_ids=ids[:, 3:], attention_mask=mask[:, :5],
                                position_ids=positions[:, 3:])
        torch.testing.assert_close(rest.logits[:, -1], expected.logits[:, -1])


def test_unsupported_versions_are_named_with_the_range():
    for version in ("5.3.0", "6.0.0"):
        problem = kv_cache.incompatibility(version)
        assert problem is not None and version in problem and kv_cache.SUPPORTED in problem
    assert kv_cache.incompatibility(transformers.__version__) is None  # guard: the same check passes here


def test_unsupported_transformers_refuses_fast_decoding_and_generate_answers(tiny_model, images, monkeypatch):
    from mm.fast_generate import greedy_generate, greedy_options

    conversation = ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], images[:1])
    fast = tiny_model.generate_batch([conversation], max_new_tokens=6)
    monkeypatch.setattr(kv_cache, "problem", lambda: kv_cache.incompatibility("6.1.0"))
    batch = tiny_model.collate([conversation])
    with pytest.raises(MMError, match=r"transformers 6\.1\.0 is installed.*>=") as raised:
        greedy_generate(tiny_model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    assert "\n" not in str(raised.value)
    with pytest.warns(UserWarning, match="generate instead"):
        assert not greedy_options({"max_new_tokens": 6})
    with pytest.warns(UserWarning):
        assert tiny_model.generate_batch([conversation], max_new_tokens=6) == fast  # through generate, same tokens
