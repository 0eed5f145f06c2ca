import pytest

from mm.errors import MMError
from mm.llm.tiny import build_tiny
from mm.prompt import (IGNORE, IMAGE_TOKEN, add_image_token, expand_images, render_chat, render_plain, truncate_images,
                       user_message)


@pytest.fixture(scope="module")
def tokenizer():
    _, tok = build_tiny("llama")
    add_image_token(tok)
    return tok


def test_chat_labels_cover_exactly_the_assistant_turns(tokenizer):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "how many?"},
        {"role": "assistant", "content": [{"type": "text", "text": "three"}]},
    ]
    ids, labels = render_chat(tokenizer, messages)
    carried = tokenizer.decode([t for t, l in zip(ids, labels) if l != IGNORE])
    assert carried == "red<|im_end|>\nthree<|im_end|>\n"
    assert all(l in (IGNORE, t) for t, l in zip(ids, labels))
    assert ids.count(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)) == 1


def test_generation_prompt_carries_no_loss(tokenizer):
    ids, labels = render_chat(tokenizer, [user_message("hi", 1)], add_generation_prompt=True)
    assert set(labels) == {IGNORE}
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_plain_text_loss_on_text_not_images(tokenizer):
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ids, labels = render_plain(tokenizer, [{"type": "image"}, {"type": "text", "text": "a red circle"}], add_eos=True)
    assert ids[0] == image_id and labels[0] == IGNORE
    assert labels[1:] == ids[1:]
    assert ids[-1] == tokenizer.eos_token_id


def test_expand_images_repeats_placeholders_without_loss():
    ids, labels = expand_images([5, 9, 6, 9], [5, IGNORE, 6, IGNORE], image_token_id=9, tokens_per_image=3)
    assert ids == [5, 9, 9, 9, 6, 9, 9, 9]
    assert labels == [5, IGNORE, IGNORE, IGNORE, 6, IGNORE, IGNORE, IGNORE]


def test_expand_images_with_laid_out_spans():
    spans = [[9, 9, 1, 9, 9], [9]]  # a tiled image with a separator, then a one-tile image
    ids, labels = expand_images([5, 9, 6, 9], [5, IGNORE, 6, IGNORE], image_token_id=9, spans=spans)
    assert ids == [5, 9, 9, 1, 9, 9, 6, 9]
    assert labels == [5] + [IGNORE] * 5 + [6, IGNORE]  # the separator carries no loss either
    with pytest.raises(MMError, match="2 image markers but 1 laid-out images"):
        expand_images([5, 9, 6, 9], [5, IGNORE, 6, IGNORE], image_token_id=9, spans=spans[:1])


def test_truncation_never_splits_an_image_span():
    ids, labels = [5, 9, 6, 9, 7], [5, IGNORE, 6, IGNORE, 7]
    spans = [[9, 9, 1, 9, 9], [9, 1, 9]]  # expanded: 5 | 9 9 1 9 9 | 6 | 9 1 9 | 7  (11 tokens)
    for seq_len in range(1, 13):
        out, out_labels, kept = truncate_images(ids, labels, 9, spans, seq_len)
        full, _ = expand_images(ids, labels, 9, spans=spans)
        assert out == full[: len(out)] and len(out) <= seq_len and len(out_labels) == len(out)
        ends = [6, 10]  # each image's span ends before these positions
        assert kept == sum(end <= len(out) for end in ends)
        starts = [1, 7]
        assert not any(start < len(out) < end for start, end in zip(starts, ends)), seq_len  # no partial span
    assert truncate_images(ids, labels, 9, spans, 4)[0] == [5]  # the cut fell inside the first image
    assert truncate_images(ids, labels, 9, spans, 8)[0:3:2] == ([5, 9, 9, 1, 9, 9, 6], 1)


def test_prompt_markers_must_match_image_count():
    with pytest.raises(MMError, match="2 <image> markers but 1 images"):
        user_message("<image> and <image>", 1)
