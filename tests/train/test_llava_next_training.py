"""A model in LLaVA-NeXT's token order (anyres, arrangement llava_next) trains: the loader's batches carry
``image_index`` so every image token takes the feature inference gives it (packed rows, DPO pairs, multiple-choice
scoring), and the model trains through the real loop."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

import mm
from mm.data.pack import collate_packed, collate_preference
from mm.data.render import Renderer
from mm.images import open_image
from mm.train.losses.dpo import pair_logps
from mm.train.losses.forward import sequence_logps

from train_helpers import run, tiny_config

LLAVA_NEXT = ["model.layout.name=anyres", "model.layout.arrangement=llava_next"]


def png(width: int, height: int, seed: int) -> bytes:
    import io

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def model_in_llava_next_order() -> mm.MultimodalModel:
    torch.manual_seed(0)
    model = mm.build(mm.ModelConfig(encoder="tiny-vit", adapter="mlp", llm="tiny-llama",
                                    layout={"name": "anyres", "arrangement": "llava_next"}))
    with torch.no_grad():
        for parameter in model.adapter.parameters():
            parameter.normal_(std=0.5)
    return model.eval()


def question(images: int, text: str) -> list[dict]:
    return [{"role": "user", "content": [*[{"type": "image"}] * images, {"type": "text", "text": text}]},
            {"role": "assistant", "content": [{"type": "text", "text": "an answer"}]}]


def image_rows(model, input_ids, pixel_values, image_index) -> torch.Tensor:
    with torch.no_grad():
        embeddings = model.embed(input_ids, pixel_values, image_index=image_index)
    return embeddings[input_ids == model.image_token_id]  # [P, D] in token order


def test_packed_rows_take_the_features_inference_takes():
    model = model_in_llava_next_order()
    renderer = Renderer.from_model(model, 1024)
    docs = [("wide", question(1, "one?"), [png(70, 30, 1)]),
            ("both", question(2, "two?"), [png(27, 80, 2), png(40, 40, 3)])]
    items = [renderer.item(key, {"kind": "chat", "messages": messages}, images, "chat")
             for key, messages, images in docs]
    batch = collate_packed([items], model.tokenizer.pad_token_id, model.encoder.transform)
    assert "image_index" in batch and len(batch["image_index"]) == int((batch["input_ids"] == model.image_token_id).sum())
    trained = image_rows(model, batch["input_ids"], batch["pixel_values"], batch["image_index"])

    expected = []
    for _, messages, images in docs:
        one = model.collate([(messages[:1], [open_image(data) for data in images])])
        expected.append(image_rows(model, one["input_ids"], one["pixel_values"], one["image_index"]))
    assert torch.equal(trained, torch.cat(expected))
    # guard: the features in encoding order are not what the tokens take
    plain = model.encode_images(batch["pixel_values"]).flatten(0, 1)[: len(trained)]
    assert not torch.equal(plain, trained)


def test_a_preference_pair_scores_each_side_as_alone():
    model = model_in_llava_next_order()
    renderer = Renderer.from_model(model, 1024)
    docs = [{"kind": "preference", "messages": question(1, "colour?")[:1], "chosen": "red", "rejected": "blue"},
            {"kind": "preference", "messages": question(2, "which?")[:1], "chosen": "left", "rejected": "right"}]
    images = [[png(70, 30, 4)], [png(27, 80, 5), png(50, 20, 6)]]
    items = [renderer.item(f"p{i}", doc, pictures, "preference") for i, (doc, pictures) in enumerate(zip(docs, images))]
    batch = collate_preference(items, model.tokenizer.pad_token_id, model.encoder.transform)
    with torch.no_grad():
        chosen, rejected, _ = pair_logps(model, batch)
        alone_chosen, _ = sequence_logps(model, batch["chosen"])
        alone_rejected, _ = sequence_logps(model, batch["rejected"])
    torch.testing.assert_close(chosen, alone_chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rejected, alone_rejected, rtol=1e-5, atol=1e-5)


def test_multiple_choice_scores_equal_the_models_own_forward():
    from mm.evaluate.choice import option_logprobs

    model = model_in_llava_next_order()
    images = [open_image(png(70, 30, 7))]
    messages = question(1, "colour?")[:1]
    (scores,) = option_logprobs(model, [(messages, images, ["red", "blue"])], reduce="sum")
    for option, score in zip(["red", "blue"], scores):
        batch = model.collate([(messages, images)])
        option_ids = model.tokenizer(option, add_special_tokens=False)["input_ids"]
        ids = torch.cat([batch["input_ids"], torch.tensor([option_ids])], dim=1)
        with torch.no_grad():
            embeddings = model.embed(ids, batch["pixel_values"], image_index=batch["image_index"])
            logits = model.llm(inputs_embeds=embeddings).logits[0].float().log_softmax(-1)
        start = batch["input_ids"].shape[1]
        expected = sum(float(logits[start - 1 + j, t]) for j, t in enumerate(option_ids))
        assert abs(score - expected) < 1e-4


def test_a_llava_next_model_trains_through_the_loop(corpus, tmp_path):
    final = run(tiny_config("1_align", tmp_path / "run", corpus, "data.seq_len=512", *LLAVA_NEXT))
    model = mm.load(final)
    assert model.layout.rearranges_features
    assert isinstance(model.generate(images=[Image.new("RGB", (90, 30), "red")], prompt="hi", max_new_tokens=2), str)
