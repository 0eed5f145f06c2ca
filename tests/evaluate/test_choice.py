"""Multiple choice by likelihood: batched option scores equal direct per-option log-probs, and the option the
model makes most likely wins."""
import pytest
import torch
import torch.nn.functional as F

from mm.evaluate import option_logprobs


def direct_logprob(model, messages, images, option):
    """Log-prob of the option tokens, one unpadded row through model.forward."""
    prompt, _ = model.tokenize(messages, chat=True)
    option_ids = model.tokenizer(option, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + option_ids])
    pixels = model.preprocess(images) if images else None
    logits = model(ids, pixel_values=pixels).logits[0]  # [T, V]
    logprobs = F.log_softmax(logits.float(), -1)
    return sum(float(logprobs[len(prompt) - 1 + i, t]) for i, t in enumerate(option_ids))


def question(text, n_images):
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


@torch.no_grad()
def test_batched_scores_equal_direct_logprobs(tiny_model, images):
    questions = [
        (question("what colour is it?", 1), images[:1], ["red", "a big blue circle", "green"]),
        (question("how many shapes are there in this picture?", 2), images[1:], ["two", "three shapes", "4"]),
    ]
    scores = option_logprobs(tiny_model, questions)
    for (messages, imgs, options), row in zip(questions, scores):
        assert row == pytest.approx([direct_logprob(tiny_model, messages, imgs, o) for o in options], abs=1e-4)
    means = option_logprobs(tiny_model, questions, reduce="mean")
    lengths = [len(tiny_model.tokenizer(o, add_special_tokens=False)["input_ids"]) for o in questions[0][2]]
    assert means[0] == pytest.approx([s / n for s, n in zip(scores[0], lengths)], abs=1e-5)


@torch.no_grad()
def test_greedy_next_token_is_the_chosen_option(tiny_model, images):
    messages = question("describe the image", 1)
    greedy = tiny_model.generate(images=images[:1], messages=messages, max_new_tokens=1)
    tokenizer = tiny_model.tokenizer
    greedy_id = tokenizer(greedy, add_special_tokens=False)["input_ids"]
    assert len(greedy_id) == 1
    # single-token options that re-tokenise to themselves: the greedy (argmax) token must score highest
    candidates = [tokenizer.decode([t]) for t in range(300, 340)]
    options = [o for o in candidates if len(tokenizer(o, add_special_tokens=False)["input_ids"]) == 1
               and o != greedy][:6] + [greedy]
    scores = option_logprobs(tiny_model, [(messages, images[:1], options)])[0]
    assert max(range(len(options)), key=scores.__getitem__) == len(options) - 1
