"""Rendering: exact loss tokens for chat, text loss for interleaved, truncation that never halves an image."""
from __future__ import annotations

import pytest

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


def _item(tiny_model, seq_len, doc, images, kind="lm"):
    from data_helpers import png

    return Renderer.from_model(tiny_model, seq_len).item("k", doc, [png()] * images, kind)


def test_document_whose_first_image_does_not_fit_is_dropped_not_kept_as_text(tiny_model):
    from mm.data.bad import BadSample

    doc = {"kind": "interleaved", "content": [{"type": "text", "text": "one two three four five"},
                                              {"type": "image", "image": "0.png"}, {"type": "text", "text": "six"}]}
    full = Renderer.from_model(tiny_model, 4096).render_lm(doc)
    first = full.ids.index(tiny_model.image_token_id)
    item = _item(tiny_model, first + tiny_model.tokens_per_image, doc, 1)  # the image fits exactly: kept
    assert len(item.images) == 1 and item.rows[0].num_images == 1
    with pytest.raises(BadSample) as error:  # text before the image would fit, the image would not
        _item(tiny_model, first + tiny_model.tokens_per_image - 1, doc, 1)
    assert error.value.reason == "too_long" and "first image does not fit" in error.value.detail


@pytest.mark.parametrize("text, images, reason", [
    ("a literal <image> marker", 1, "image_mismatch"),  # two markers, one image
    ("fine", 2, "image_mismatch"),  # one marker, two images
    ("fine", 1, None),
])
def test_markers_are_checked_against_images_before_batching(tiny_model, text, images, reason):
    from mm.data.bad import BadSample

    doc = {"kind": "interleaved", "content": [{"type": "image", "image": "0.png"}, {"type": "text", "text": text}]}
    if reason is None:
        item = _item(tiny_model, 512, doc, images)
        assert item.rows[0].ids.count(tiny_model.image_token_id) == len(item.images) * tiny_model.tokens_per_image
        return
    with pytest.raises(BadSample) as error:
        _item(tiny_model, 512, doc, images)
    assert error.value.reason == reason


REFUSING_TEMPLATE = (  # the Llama-2 / Mistral style: a conversation whose roles do not alternate raises
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_conversation_the_chat_template_refuses_is_skipped_as_malformed_not_fatal(tiny_model):
    import copy
    import dataclasses

    from mm.data.bad import BadSample

    tokenizer = copy.deepcopy(tiny_model.tokenizer)
    tokenizer.chat_template = REFUSING_TEMPLATE
    renderer = dataclasses.replace(Renderer.from_model(tiny_model, 512), tokenizer=tokenizer)
    good = {"kind": "chat", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    assert renderer.item("k", good, [], "chat").rows[0].targets > 0
    refused = {"kind": "chat", "messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "yo"},
                                            {"role": "assistant", "content": "no"}]}
    with pytest.raises(BadSample) as error:
        renderer.item("k", refused, [], "chat")
    assert error.value.reason == "malformed_json" and "must alternate" in error.value.detail


def test_document_without_a_loss_token_is_no_target_not_too_long(tiny_model):
    from mm.data.bad import BadSample

    doc = {"kind": "chat", "messages": [{"role": "user", "content": [{"type": "image", "image": "0.png"},
                                                                     {"type": "text", "text": "hello"}]}]}
    with pytest.raises(BadSample) as error:
        _item(tiny_model, 512, doc, 1)
    assert error.value.reason == "no_target"
