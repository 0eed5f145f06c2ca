"""The streaming loader: batch contract, determinism, resume, splitting by rank, weighted mixing."""
from __future__ import annotations

import re
from collections import Counter

import pytest
import torch

from mm.data import DataConfig, build_loader
from mm.errors import MMError

from data_helpers import write_captions


def _take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def _equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _doc_numbers(batch, tokenizer, image_id):
    numbers = []
    for row in batch["input_ids"]:
        text = tokenizer.decode([t for t in row.tolist() if t != image_id], skip_special_tokens=True)
        numbers += [int(n) for n in re.findall(r"doc (\d+)", text)]
    return numbers


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    directory = tmp_path_factory.mktemp("caps")
    write_captions(directory, 40, shards=4)
    return directory


def test_packed_batch_contract(tiny_model, shards):
    data = DataConfig(train=str(shards), batch_size=2, seq_len=96, shuffle_buffer=4)
    batch = next(iter(build_loader(data, tiny_model)))
    B, T = batch["input_ids"].shape
    assert B == 2 and T <= 96
    assert "attention_mask" not in batch  # documents are separated by position_ids (mm/llm/attention.py)
    placeholders = int((batch["input_ids"] == tiny_model.image_token_id).sum())
    assert placeholders == batch["pixel_values"].shape[0] * tiny_model.tokens_per_image
    assert batch["pixel_values"].shape[1:] == (3, 32, 32)
    assert (batch["position_ids"] == 0).sum() > B  # positions restart inside rows: several docs per row


def test_padding_fallback(tiny_model, shards):
    data = DataConfig(train=str(shards), batch_size=3, seq_len=96, pack=False, resample=False)
    batch = next(iter(build_loader(data, tiny_model)))
    assert batch["attention_mask"].shape == batch["input_ids"].shape and batch["attention_mask"].dtype == torch.long
    assert torch.equal(batch["position_ids"][0], torch.arange(batch["input_ids"].shape[1]))
    lengths = batch["attention_mask"].sum(1)
    assert lengths.max() == batch["input_ids"].shape[1]


def test_same_seed_same_batches_other_seed_other_order(tiny_model, shards):
    data = DataConfig(train=str(shards), batch_size=2, seq_len=96, shuffle_buffer=8, seed=3)
    first, second = _take(build_loader(data, tiny_model), 4), _take(build_loader(data, tiny_model), 4)
    for a, b in zip(first, second):
        _equal(a, b)
    other = _take(build_loader(DataConfig(**{**data.__dict__, "seed": 4}), tiny_model), 4)
    assert any(not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, other))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_reproduces_the_uninterrupted_run(tiny_model, shards, workers):
    data = DataConfig(train=str(shards), batch_size=2, seq_len=96, shuffle_buffer=8, seed=1, num_workers=workers)
    full = _take(build_loader(data, tiny_model), 9)
    for skip in (3, 6):
        resumed = _take(build_loader(data, tiny_model, skip_batches=skip), 9 - skip)
        for a, b in zip(full[skip:], resumed):
            _equal(a, b)


@pytest.mark.parametrize("n_shards", [4, 1])
def test_ranks_see_disjoint_documents_covering_the_pass(tiny_model, tmp_path, n_shards):
    write_captions(tmp_path, 24, shards=n_shards)
    seen = []
    for rank in range(2):
        data = DataConfig(train=str(tmp_path), batch_size=2, seq_len=96, pack=False, resample=False)
        loader = build_loader(data, tiny_model, rank=rank, world_size=2)
        seen.append([n for b in loader for n in _doc_numbers(b, tiny_model.tokenizer, tiny_model.image_token_id)])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(24))


def test_weighted_mixing_of_sources(tiny_model, tmp_path):
    write_captions(tmp_path / "a", 10, shards=1)  # docs 0..9
    from mm.data import ShardWriter

    from data_helpers import caption_doc, png
    with ShardWriter(tmp_path / "b", "b", 100) as writer:
        for i in range(10):
            writer.add(f"b{i}", caption_doc(f"doc {100 + i}"), [png()])
    data = DataConfig(train=[str(tmp_path / "a"), str(tmp_path / "b")], weights=[3, 1], batch_size=4, seq_len=64,
                      pack=False, shuffle_buffer=1)
    numbers = [n for b in _take(build_loader(data, tiny_model), 75)
               for n in _doc_numbers(b, tiny_model.tokenizer, tiny_model.image_token_id)]
    share = Counter(n < 100 for n in numbers)[True] / len(numbers)
    assert 0.65 < share < 0.85, share


def test_config_errors(tiny_model, shards, tmp_path):
    with pytest.raises(MMError, match="no shards"):
        build_loader(DataConfig(train=str(tmp_path / "none")), tiny_model)
    with pytest.raises(MMError, match="weights"):
        build_loader(DataConfig(train=[str(shards)], weights=[1, 2]), tiny_model)
    with pytest.raises(MMError, match="kind"):
        build_loader(DataConfig(train=str(shards)), tiny_model, kind="video")
