"""Rendering: exact loss tokens for chat, text loss for interleaved, truncation that never halves an image."""
from __future__ import annotations

from mm.data.render import Renderer
from mm.prompt import IGNORE


def _runs(seq):
    runs, current = [], []
    for label in seq.labels:
        if label != IGNORE:
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_two_turn_chat_labels_are_exactly_the_assistant_tokens(tiny_model):
    tok = tiny_model.tokenizer
    renderer = Renderer.from_model(tiny_model, 512)
    doc = {"kind": "chat", "messages": [
        {"role": "user", "content": [{"type": "image", "image": "0.png"}, {"type": "text", "text": "What color?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": [{"type": "text", "text": "How many?"}]},
        {"role": "assistant", "content": "3"}]}
    seq = renderer.render_lm(doc)
    ids = tok("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    expected_ids = ids + [tiny_model.image_token_id] * tiny_model.tokens_per_image + tok(
        "What color?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n<|im_start|>user\nHow many?<|im_end|>\n"
        "<|im_start|>assistant\n3<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert seq.ids == expected_ids
    runs = _runs(seq)
    assert [tok.decode(run) for run in runs] == ["red<|im_end|>\n", "3<|im_end|>\n"]
    # every labelled position holds its own input token (next-token shift is the model's job)
    assert all(label in (IGNORE, token) for token, label in zip(seq.ids, seq.labels))
    assert seq.num_images == 1


def test_interleaved_loss_on_text_and_eos_not_on_images(tiny_model):
    renderer = Renderer.from_model(tiny_model, 512)
    doc = {"kind": "interleaved", "content": [{"type": "image", "image": "0.png"}, {"type": "text", "text": "a cat."},
                                              {"type": "image", "image": "1.png"}, {"type": "text", "text": " a dog."}]}
    seq = renderer.render_lm(doc)
    n = tiny_model.tokens_per_image
    assert seq.ids.count(tiny_model.image_token_id) == 2 * n and seq.num_images == 2
    text = [token for token, label in zip(seq.ids, seq.labels) if label != IGNORE]
    assert tiny_model.tokenizer.decode(text) == "a cat. a dog.<|im_end|>"
    assert all(label == IGNORE for token, label in zip(seq.ids, seq.labels) if token == tiny_model.image_token_id)


def test_truncation_drops_a_partial_image_and_what_follows(tiny_model):
    n = tiny_model.tokens_per_image
    doc = {"kind": "interleaved", "content": [{"type": "text", "text": "one two three"},
                                              {"type": "image", "image": "0.png"}, {"type": "text", "text": "four"},
                                              {"type": "image", "image": "1.png"}, {"type": "text", "text": "five"}]}
    full = Renderer.from_model(tiny_model, 4096).render_lm(doc)
    second = [i for i, t in enumerate(full.ids) if t == tiny_model.image_token_id][n]  # start of image 2
    for seq_len in range(second + 1, second + n):  # every cut inside image 2
        seq = Renderer.from_model(tiny_model, seq_len).render_lm(doc)
        assert seq.ids == full.ids[:second] and seq.num_images == 1
    seq = Renderer.from_model(tiny_model, second + n).render_lm(doc)  # image 2 fits exactly
    assert seq.num_images == 2 and len(seq) == second + n
    first = full.ids.index(tiny_model.image_token_id)
    seq = Renderer.from_model(tiny_model, first + 3).render_lm(doc)
    assert seq.num_images == 0 and seq.ids == full.ids[:first]
