"""``data.max_row_image_tokens``: a packed row never holds more image tokens (tiles, thumbnails, separators) than
the budget; a document's images take fewer tiles to fit it; a document that cannot fit it even at one tile per image
is dropped and counted (``dropped/too_many_image_tokens``), never sent to the model. Real shards, the real loader."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import mm
from mm.data import ShardWriter, build_loader
from mm.data.config import DataConfig
from mm.data.pack import Packer
from mm.data.render import Item, Sequence
from mm.errors import MMError

from data_helpers import caption_doc, png

SQUARE = (64, 64)  # with 32 px tiles and max_tiles 4: a 2x2 grid + thumbnail = 5 tiles, 5 * 16 + 2 = 82 tokens


@pytest.fixture(scope="module")
def dynamic_model():
    torch.manual_seed(0)
    return mm.build(mm.ModelConfig(encoder="tiny-vit", adapter="mlp", llm="tiny-llama",
                                   layout={"name": "dynamic", "max_tiles": 4}))


@pytest.fixture(scope="module")
def fixed_model(tiny_model):
    return tiny_model


def write(directory, docs: list[tuple[str, int]]) -> str:
    """One shard: per document its text and how many 64x64 images precede it."""
    with ShardWriter(directory, "docs", samples_per_shard=len(docs)) as writer:
        for i, (text, images) in enumerate(docs):
            writer.add(f"doc{i:03d}", caption_doc(text, images), [png((40 * i % 255, 90, 30), SQUARE)] * images)
    return str(directory / "docs-*.tar")


def one_pass(model, shards: str, **options):
    data = DataConfig(train=shards, batch_size=2, seq_len=512, shuffle_buffer=1, resample=False, **options)
    loader = build_loader(data, model, kind="interleaved")
    return list(loader), loader.metrics()


def per_row(batch, model) -> list[tuple[int, int]]:
    """Per row of a packed batch: (documents, image ids)."""
    starts = (batch["position_ids"] == 0) & (batch["input_ids"] != model.tokenizer.pad_token_id)
    images = (batch["input_ids"] == model.image_token_id).sum(1)
    return [(int(s), int(i)) for s, i in zip(starts.sum(1), images)]


def span_tokens(model, images: int) -> int:
    """Tokens of one document's 64x64 images laid out in full (tiles, thumbnail, separators)."""
    from PIL import Image

    return sum(len(span) for span in model.image_spans([Image.new("RGB", SQUARE)] * images))


def test_rows_stay_within_the_budget(dynamic_model, tmp_path):
    shards = write(tmp_path, [(f"a red circle number {i}", 1) for i in range(8)])
    full = span_tokens(dynamic_model, 1)
    assert full == 82  # the arithmetic of SQUARE above: whole images fit the budget below, two do not
    free, _ = one_pass(dynamic_model, shards)
    capped, metrics = one_pass(dynamic_model, shards, max_row_image_tokens=100)
    free_rows = [row for batch in free for row in per_row(batch, dynamic_model)]
    capped_rows = [row for batch in capped for row in per_row(batch, dynamic_model)]
    assert max(images for _, images in free_rows) > 100  # guard: unbudgeted packing puts several images in a row
    assert sum(docs for docs, _ in capped_rows) == sum(docs for docs, _ in free_rows) == 8  # nothing dropped
    assert all(docs == 1 and images == 80 for docs, images in capped_rows)  # every image whole, one per row
    assert sum(batch["pixel_values"].shape[0] for batch in capped) == 8 * 5
    assert metrics["data/good"] == 8 and not any(k.startswith("dropped/") for k in metrics)


def test_a_document_takes_fewer_tiles_to_fit_the_row(dynamic_model, tmp_path):
    shards = write(tmp_path, [(f"a red circle number {i}", 1) for i in range(6)])
    batches, metrics = one_pass(dynamic_model, shards, max_row_image_tokens=50)
    rows = [row for batch in batches for row in per_row(batch, dynamic_model)]
    assert all(images <= 50 for _, images in rows)
    assert sum(batch["pixel_values"].shape[0] for batch in batches) == 6  # one tile each (16 tokens), not five
    assert max(docs for docs, _ in rows) == 3  # still packed: three 16-token images share a 50-token row
    assert metrics["data/good"] == 6


def test_a_document_over_the_budget_is_dropped_and_counted(dynamic_model, tmp_path):
    shards = write(tmp_path, [("one image", 1), ("four images", 4), ("one more", 1)])
    batches, metrics = one_pass(dynamic_model, shards, max_row_image_tokens=50)  # 4 images >= 64 tokens
    assert metrics["data/good"] == 2 and metrics["dropped/too_many_image_tokens"] == 1
    assert not any(k.startswith("bad/") for k in metrics)  # a valid document this run cannot use, not bad data
    assert sum(docs for batch in batches for docs, _ in per_row(batch, dynamic_model)) == 2
    loader = build_loader(DataConfig(train=shards, batch_size=2, seq_len=512, shuffle_buffer=1, resample=False,
                                     max_row_image_tokens=50), dynamic_model, kind="interleaved")
    list(loader)
    example = loader.counter.examples["too_many_image_tokens"][0]
    assert example["key"] == "doc001" and "data.max_row_image_tokens" in example["detail"]


def test_the_fixed_layout_keeps_whole_documents_within_the_budget(fixed_model, tmp_path):
    """With ``fixed`` every image is ``tokens_per_image`` tokens: the row budget bounds images per row, and a
    document with more images than that is dropped."""
    per_image = fixed_model.tokens_per_image
    shards = write(tmp_path, [("two", 2), ("one", 1), ("three", 3), ("one again", 1)])
    batches, metrics = one_pass(fixed_model, shards, max_row_image_tokens=2 * per_image)
    rows = [row for batch in batches for row in per_row(batch, fixed_model)]
    assert all(images <= 2 * per_image for _, images in rows)
    assert metrics["dropped/too_many_image_tokens"] == 1 and metrics["data/good"] == 3
    assert sorted(images // per_image for _, images in rows) == [2, 2]  # "one" + "one again" share a row


def test_the_budget_holds_unpacked_too(dynamic_model, tmp_path):
    shards = write(tmp_path, [("x", 1), ("y", 1)])
    batches, _ = one_pass(dynamic_model, shards, max_row_image_tokens=50, pack=False)
    assert [int(n) for batch in batches for n in (batch["input_ids"] == dynamic_model.image_token_id).sum(1)] \
        == [16, 16]


def test_a_budget_below_one_is_refused(dynamic_model, tmp_path):
    shards = write(tmp_path, [("x", 1)])
    with pytest.raises(MMError, match="data.max_row_image_tokens must be a positive integer, got 0"):
        one_pass(dynamic_model, shards, max_row_image_tokens=0)


def item(key: str, tokens: int, image_tokens: int) -> Item:
    return Item(key, [dataclasses.replace(Sequence([1] * tokens, [1] * tokens, 1), image_tokens=image_tokens)])


def test_packer_fits_both_tokens_and_image_tokens():
    items = [item("a", 10, 8), item("b", 10, 8), item("c", 10, 0), item("d", 10, 2)]
    rows = [[i.key for i in row] for batch in Packer(64, 4, max_image_tokens=10)(items) for row in batch]
    assert sorted(rows) == [["a", "c", "d"], ["b"]]  # b would take a's row past 10 image tokens
    plain = [[i.key for i in row] for batch in Packer(64, 4)(items) for row in batch]
    assert plain == [["a", "b", "c", "d"]]  # guard: without the budget, all in one row
    with pytest.raises(MMError, match="doc-x: 10 tokens, 11 of them image tokens"):
        list(Packer(64, 4, max_image_tokens=10)([item("doc-x", 10, 11)]))
