"""Fast greedy decoding equals transformers' greedy generate token for token (left padding, EOS, images)."""
import torch

from mm.fast_generate import decoder, greedy_generate, greedy_options


def conversations(images):
    return [
        ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image please"}]}],
         images[:1]),
        ([{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "hi"}]}],
         images[1:]),
    ]


@torch.no_grad()
def test_equals_generate(tiny_model, images):
    model = tiny_model
    batch = model.collate(conversations(images))
    embeddings = model.embed(batch["input_ids"], batch["pixel_values"])
    for eos in (model.tokenizer.eos_token_id, None):
        expected = model.llm.generate(inputs_embeds=embeddings, attention_mask=batch["attention_mask"],
                                      max_new_tokens=24, do_sample=False, pad_token_id=model.tokenizer.pad_token_id,
                                      eos_token_id=eos)
        ours = greedy_generate(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                               max_new_tokens=24, eos_token_id=eos, pad_token_id=model.tokenizer.pad_token_id)
        assert torch.equal(ours, expected)


@torch.no_grad()
def test_stops_at_eos(tiny_model, images):
    model = tiny_model
    batch = model.collate(conversations(images)[:1])
    free = greedy_generate(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                           max_new_tokens=6)
    eos = int(free[0, 2])  # pretend the third greedy token is the end of turn
    stopped = greedy_generate(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                              max_new_tokens=6, eos_token_id=eos)
    assert stopped[0].tolist() == free[0, : free[0].tolist().index(eos) + 1].tolist()


def test_greedy_options():
    assert greedy_options({"max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0, "num_beams": 1})
    assert not greedy_options({"temperature": 0.7})
    assert not greedy_options({"num_beams": 2})
    assert not greedy_options({"num_return_sequences": 2})
    assert not greedy_options({"repetition_penalty": 1.2})


@torch.no_grad()
def test_streamer_sees_every_token(tiny_model, images):
    from transformers import TextStreamer

    class Collect(TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            self.text = getattr(self, "text", "") + text

    model = tiny_model
    batch = model.collate(conversations(images)[:1])
    streamer = Collect(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
    new = greedy_generate(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                          max_new_tokens=8, streamer=streamer)
    assert streamer.text == model.tokenizer.decode(new[0], skip_special_tokens=True)


def single(text, image):
    return [([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}], [image])]


def reference(model, batch, max_new_tokens=12):
    embeddings = model.embed(batch["input_ids"], batch["pixel_values"])
    return model.llm.generate(inputs_embeds=embeddings, attention_mask=batch["attention_mask"],
                              max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                              pad_token_id=model.tokenizer.pad_token_id)


@torch.no_grad()
def test_prefix_reuse_equals_generate(tiny_model, images):
    import copy

    model = copy.deepcopy(tiny_model)  # its own prefix entry and weights
    first = model.collate(single("describe the image please", images[0]))
    image_at = int((first["input_ids"][0] == model.image_token_id).nonzero()[0])
    assert image_at >= 2  # the chat template's turn header precedes the image
    run = lambda batch: greedy_generate(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                        max_new_tokens=12, pad_token_id=model.tokenizer.pad_token_id)
    assert torch.equal(run(first), reference(model, first))  # miss: computes and keeps the prefix
    entry = decoder(model).prefix
    assert entry.ids == first["input_ids"][0, :image_at].tolist()
    assert torch.equal(run(first), reference(model, first))  # hit: same prompt
    other = model.collate(single("what colour is it", images[1]))  # same prefix, other image and text
    assert torch.equal(run(other), reference(model, other))
    assert decoder(model).prefix is entry  # reused, not recomputed
    without = greedy_generate(model, other["input_ids"], other["attention_mask"], other["pixel_values"],
                              max_new_tokens=12, pad_token_id=model.tokenizer.pad_token_id, reuse_prefix=False)
    assert torch.equal(without, run(other))

    layer = model.llm.model.layers[0].self_attn.k_proj.weight  # weights change in place: the entry is stale
    layer.add_(torch.randn_like(layer))
    assert torch.equal(run(first), reference(model, first))
    assert decoder(model).prefix is not entry


@torch.no_grad()
def test_prefix_reuse_text_only_and_batches(tiny_model, images):
    import copy

    model = copy.deepcopy(tiny_model)
    for texts in (["hello there"], ["hello there, who are you?"], ["hi", "hi"], ["a b c", "a b c d e"]):
        conversations = [([{"role": "user", "content": [{"type": "text", "text": t}]}], []) for t in texts]
        batch = model.collate(conversations)
        embeddings = model.embed(batch["input_ids"])
        expected = model.llm.generate(inputs_embeds=embeddings, attention_mask=batch["attention_mask"],
                                      max_new_tokens=10, do_sample=False, eos_token_id=None,
                                      pad_token_id=model.tokenizer.pad_token_id)
        ours = greedy_generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=10,
                               pad_token_id=model.tokenizer.pad_token_id)
        assert torch.equal(ours, expected), texts


@torch.no_grad()
def test_compiled_equals_eager_across_prompt_lengths(images):
    """The compiled encoder, prefill (dynamic length) and step give the eager tokens; weights changed after
    compilation are seen (parameters are graph inputs, not constants)."""
    import mm

    torch.manual_seed(3)
    model = mm.build(mm.ModelConfig(encoder="tiny-vit", adapter="mlp", llm="tiny-llama"))
    pad = model.tokenizer.pad_token_id
    for conversation in conversations(images):  # two prompt lengths, one and two images
        batch = model.collate([conversation])
        args = (model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        eager = greedy_generate(*args, max_new_tokens=8, pad_token_id=pad, reuse_prefix=False)
        compiled = greedy_generate(*args, max_new_tokens=8, pad_token_id=pad, reuse_prefix=False, compile=True)
        assert torch.equal(compiled, eager)
    with torch.no_grad():
        model.llm.get_output_embeddings().weight.mul_(-1)
    changed = greedy_generate(*args, max_new_tokens=8, pad_token_id=pad, reuse_prefix=False)
    assert torch.equal(greedy_generate(*args, max_new_tokens=8, pad_token_id=pad, reuse_prefix=False, compile=True),
                       changed)
    assert not torch.equal(changed, eager)


@torch.no_grad()
def test_decoding_state_is_owned_not_planted(images):
    """Runners and the prefix entry live outside the model: no new attribute on the model or its LLM, nothing in
    its state_dict, a deep copy starts with no state, and the state does not keep the model alive."""
    import copy
    import gc
    import weakref

    import mm

    torch.manual_seed(0)
    model = mm.build(mm.ModelConfig(encoder="tiny-vit", adapter="mlp", llm="tiny-llama"))
    before = (set(model.__dict__), set(model.llm.__dict__), set(model.state_dict()))
    batch = model.collate(conversations(images)[:1])
    greedy_generate(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], max_new_tokens=4)
    assert decoder(model).prefix is not None and decoder(model).runners  # guard: there is state to keep
    assert (set(model.__dict__), set(model.llm.__dict__), set(model.state_dict())) == before
    assert decoder(copy.deepcopy(model)).prefix is None
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


class StopAfter:
    """A per-row stopping criterion: row r is done once it has ``limits[r]`` new tokens."""

    def __init__(self, limits):
        self.limits = torch.tensor(limits)

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1]) >= self.limits


@torch.no_grad()
def test_per_row_stopping_criteria_equal_generate(tiny_model, images):
    from transformers import StoppingCriteriaList

    model = tiny_model
    batch = model.collate(conversations(images))
    embeddings = model.embed(batch["input_ids"], batch["pixel_values"])
    pad = model.tokenizer.pad_token_id
    never = model.tokenizer.convert_tokens_to_ids("<image>")  # an end-of-sequence id greedy never emits here
    for limits, eos in (([2, 5], never), ([3, 3], never), ([2, 5], None)):
        criteria = StoppingCriteriaList([StopAfter(limits)])
        expected = model.llm.generate(inputs_embeds=embeddings, attention_mask=batch["attention_mask"],
                                      max_new_tokens=8, do_sample=False, pad_token_id=pad, eos_token_id=eos,
                                      stopping_criteria=criteria)
        ours = greedy_generate(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                               max_new_tokens=8, pad_token_id=pad, eos_token_id=eos, stopping_criteria=criteria)
        assert torch.equal(ours, expected)
        assert ours.shape[1] == max(limits)
        if limits[0] < limits[1]:  # row 0 ended first: padded after its end only when an eos id is given
            assert bool((ours[0, limits[0]:] == pad).all()) == (eos is not None)
