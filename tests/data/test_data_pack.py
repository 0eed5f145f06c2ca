"""Packing: positions restart per document and no T x T mask is built; no attention across documents (a packed
row's logits equal each document run alone)."""
from __future__ import annotations

import torch

import mm
from mm.data.pack import Packer, collate_packed, collate_rows
from mm.data.render import Item, Renderer, Sequence
from mm.images import open_image
from mm.llm.attention import document_lengths

from data_helpers import caption_doc, chat_doc, png


def _items(model, docs_and_images):
    renderer = Renderer.from_model(model, 512)
    items = []
    for i, (doc, images) in enumerate(docs_and_images):
        seq = renderer.render_lm(doc)
        items.append(Item(f"d{i}", [seq], [open_image(b) for b in images]))
    return items


def test_packed_row_logits_equal_each_document_alone():
    """Through the training forward (a fresh model: choosing the packed attention path changes it)."""
    from mm.train.losses.forward import hidden_states

    torch.manual_seed(0)
    model = mm.build(mm.ModelConfig(encoder="tiny-vit", adapter="mlp", llm="tiny-llama"))
    docs = [
        (caption_doc("two red circles on the left."), [png((200, 0, 0))]),
        (chat_doc("What color are the shapes?", "blue"), [png((0, 0, 200), (40, 30))]),
        (caption_doc("the word cat. the word dog.", images=2), [png((0, 200, 0)), png((9, 9, 9))]),
    ]
    items = _items(model, docs)
    transform = model.encoder.transform
    packed = collate_packed([items], model.tokenizer.pad_token_id, transform)
    head = model.llm.get_output_embeddings()
    with torch.no_grad():
        logits = head(hidden_states(model, packed))[0]  # [T, V]
        at = 0
        for item in items:
            alone = collate_rows([item], model.tokenizer.pad_token_id, transform)
            single = head(hidden_states(model, alone))[0]
            n = len(item.rows[0])
            torch.testing.assert_close(logits[at: at + n], single, rtol=1e-4, atol=1e-5)
            at += n
        # the boundaries matter: one row of plain causal attention gives different logits for doc 2
        causal = head(hidden_states(model, {**packed, "position_ids": torch.arange(at)[None]}))[0]
        n0 = len(items[0].rows[0])
        assert not torch.allclose(causal[n0: n0 + 5], logits[n0: n0 + 5], atol=1e-4)


def test_positions_restart_per_document_and_no_mask_is_built():
    items = [Item(str(i), [Sequence([5] * n, [5] * n, 0)], []) for i, n in enumerate((3, 2))]
    batch = collate_packed([items, items[:1]], pad_id=0, transform=None)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no [B, 1, T, T] mask, memory linear in T
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 0, 1]]  # padding: a block of its own
    assert batch["labels"][0].tolist() == [-100, 5, 5, -100, 5]  # a document's first token is no target
    assert batch["labels"][1].tolist() == [-100, 5, 5, -100, -100]  # padding carries no loss
    assert document_lengths(batch["position_ids"], 2, 5) == [[3, 2], [3, 2]]


def test_packer_is_deterministic_fills_rows_and_keeps_every_document():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(20, 300) for _ in range(400)]
    items = [Item(str(i), [Sequence([1] * n, [1] * n, 0)], []) for i, n in enumerate(lengths)]
    batches = list(Packer(seq_len=1024, batch_size=4)(items))
    again = list(Packer(seq_len=1024, batch_size=4)(items))
    assert [[[it.key for it in row] for row in b] for b in batches] == [[[it.key for it in row] for row in b]
                                                                        for b in again]
    keys = sorted(it.key for b in batches for row in b for it in row)
    assert keys == sorted(it.key for it in items)
    assert all(sum(len(it.rows[0]) for it in row) <= 1024 for b in batches for row in b)
    full = [row for b in batches[:-2] for row in b]
    assert sum(sum(len(it.rows[0]) for it in row) for row in full) / (1024 * len(full)) > 0.95
