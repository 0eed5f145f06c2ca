import pytest
import torch

import mm
from mm.errors import MMError
from mm.prompt import user_message


def test_placeholder_mismatch_names_both_numbers(tiny_model, images):
    batch = tiny_model.collate([([user_message("two?", 2)], images[:2])])
    with pytest.raises(MMError, match=rf"placeholder tokens \({2 * tiny_model.tokens_per_image}\).*features \({tiny_model.tokens_per_image}:"):
        tiny_model(batch["input_ids"], pixel_values=batch["pixel_values"][:1])
    with pytest.raises(MMError, match=r"placeholder tokens \(0\) do not match image features"):
        tiny_model(torch.tensor([[5, 6, 7]]), pixel_values=batch["pixel_values"][:1])


def test_features_land_in_their_placeholders_in_order(tiny_model, images):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]}]
    batch = tiny_model.collate([(messages, images[:2])])
    embeddings = tiny_model.embed(batch["input_ids"], batch["pixel_values"])
    features = tiny_model.encode_images(batch["pixel_values"])  # [2, M, D]
    positions = (batch["input_ids"][0] == tiny_model.image_token_id).nonzero().squeeze(-1)
    torch.testing.assert_close(embeddings[0, positions], features.reshape(-1, features.shape[-1]), rtol=0, atol=0)


def test_kv_cache_generation_equals_no_cache(tiny_model, images):
    kwargs = dict(images=images[:2], prompt="what is here?", max_new_tokens=12)
    assert tiny_model.generate(use_cache=True, **kwargs) == tiny_model.generate(use_cache=False, **kwargs)


def test_batched_generation_equals_one_by_one(tiny_model, images):
    conversations = [
        ([user_message("describe", 1)], images[:1]),
        ([user_message("a much longer question about both images", 2)], images[1:3]),
        ([user_message("text only", 0)], []),
    ]
    batched = tiny_model.generate_batch(conversations, max_new_tokens=10)
    single = [tiny_model.generate_batch([c], max_new_tokens=10)[0] for c in conversations]
    assert batched == single


def test_beams_sampling_and_several_returns(tiny_model, images):
    torch.manual_seed(0)
    out = tiny_model.generate_batch([([user_message("x", 1)], images[:1])], max_new_tokens=4, temperature=0.8,
                                    top_p=0.9, num_return_sequences=2)
    assert len(out) == 2
    assert isinstance(tiny_model.generate(images=images[:1], prompt="x", max_new_tokens=4, num_beams=3), str)


def test_labels_give_a_loss_and_only_the_adapter_trains(tiny_model, images):
    ids, labels = tiny_model.tokenize(
        [user_message("colour?", 1), {"role": "assistant", "content": "red"}], add_generation_prompt=False
    )
    output = tiny_model(torch.tensor([ids]), tiny_model.preprocess(images[:1]), labels=torch.tensor([labels]))
    output.loss.backward()
    assert all(p.grad is not None for p in tiny_model.adapter.parameters())
    assert all(p.grad is None for p in tiny_model.llm.parameters())
    assert all(p.grad is None for p in tiny_model.encoder.parameters())
    tiny_model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("llm", ["tiny-qwen2", "tiny-mistral", "tiny-gpt2"])
def test_other_llm_families(llm, images):
    model = mm.build(mm.ModelConfig(llm=llm, adapter={"name": "pool", "size": 2}))
    assert model.tokens_per_image == 4
    kwargs = dict(images=images[:1], prompt="hi", max_new_tokens=5)
    assert model.generate(use_cache=True, **kwargs) == model.generate(use_cache=False, **kwargs)


def test_unknown_parts_list_the_choices():
    with pytest.raises(MMError, match=r"unknown llm 'nope'; choose one of: .*tiny-llama"):
        mm.build(mm.ModelConfig(llm="nope"))
    with pytest.raises(MMError, match=r"unknown adapter"):
        mm.build(mm.ModelConfig(adapter="nope"))
