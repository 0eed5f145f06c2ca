"""Export of the anyres layout (arrangement llava_next) to transformers LLaVA-NeXT: same pixels, same tokens (but
the row newlines), same logits and greedy answers; refusals in one line naming why."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

import mm
from mm.errors import MMError
from mm.interop import check_exportable, export_llava_next
from mm.interop.llava_next_export import to_llava_next
from mm.prompt import user_message

LAYOUT = {"name": "anyres", "arrangement": "llava_next"}
TWO_IMAGES = [{"role": "user", "content": [{"type": "text", "text": "compare "}, {"type": "image"},
                                           {"type": "text", "text": " and "}, {"type": "image"}]}]


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


WIDE, TALL = noise(70, 30, 1), noise(27, 80, 2)  # 32 px tiles: a 3x1 and a 1x3 grid, both padded


def build(tower, adapter: str = "mlp", layout=LAYOUT) -> mm.MultimodalModel:
    torch.manual_seed(0)
    model = mm.build(mm.ModelConfig(encoder={"name": f"hf:{tower}", "select_layer": -2}, adapter=adapter,
                                    llm="tiny-llama", layout=layout))
    with torch.no_grad():  # large enough to move the logits
        for parameter in model.adapter.parameters():
            parameter.normal_(std=0.5)
    return model


def their_inputs(model, processor, messages, images):
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=images, text=text, return_tensors="pt")


def check_same(model, llava, processor, messages, images) -> float:
    """Same pixels, same ids except the newline rows (LlavaNext: <image> filled with image_newline), same answer;
    returns the largest logit difference."""
    batch = model.collate([(messages, images)])
    inputs = their_inputs(model, processor, messages, images)
    counts = [t.num_images for t in model.layout_images(images)]
    pixels = torch.cat([p[:n] for p, n in zip(inputs["pixel_values"], counts)])  # per image: base, then tiles
    assert torch.equal(pixels, batch["pixel_values"])
    ours = batch["input_ids"]
    newline_rows = (ours == model.newline_id) & (inputs["input_ids"] == model.image_token_id)
    assert int(newline_rows.sum()) > 0
    assert torch.equal(ours.masked_fill(newline_rows, model.image_token_id), inputs["input_ids"])
    vocab = model.llm.get_input_embeddings().num_embeddings
    with torch.no_grad():
        difference = (model(**batch).logits - llava(**inputs).logits[..., :vocab]).abs().max().item()
    expected = model.generate(images=images, messages=messages, max_new_tokens=8)
    output = llava.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0] == expected
    return difference


@pytest.mark.parametrize("family,adapter", [("clip", "mlp"), ("siglip", "linear")])
def test_export_matches_llava_next(towers, family, adapter, tmp_path):
    model = build(towers[family], adapter)
    grids = [t.grid for t in model.layout_images([WIDE, TALL])]
    assert grids == [(3, 1), (1, 3)]
    export_llava_next(model, tmp_path)
    llava = LlavaNextForConditionalGeneration.from_pretrained(tmp_path).eval()
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(processor).__name__ == "LlavaNextProcessor"
    differences = [check_same(model, llava, processor, [user_message("describe the image", 1)], [image])
                   for image in (WIDE, TALL)]
    differences.append(check_same(model, llava, processor, TWO_IMAGES, [TALL, WIDE]))
    assert max(differences) <= 1e-4, differences
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["image_grid_pinpoints"] == [[64, 32], [32, 64], [64, 64], [32, 96], [96, 32]]  # [height, width]


def test_token_counts_match_the_processor_for_many_shapes(towers, tmp_path):
    """Exact fits (no padding), extreme ratios and tiny images: the same ids (newline rows aside) and pixels."""
    model = build(towers["clip"])
    export_llava_next(model, tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    messages = [user_message("hi", 1)]
    for seed, (width, height) in enumerate([(64, 32), (32, 96), (64, 64), (300, 7), (7, 300), (5, 4), (33, 65),
                                            (100, 99)]):
        image = noise(width, height, seed)
        batch = model.collate([(messages, [image])])
        inputs = their_inputs(model, processor, messages, [image])
        ours = batch["input_ids"].masked_fill(batch["input_ids"] == model.newline_id, model.image_token_id)
        theirs = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.newline_id, model.image_token_id)
        assert torch.equal(ours, theirs), (width, height)
        tiles = len(batch["pixel_values"])
        assert torch.equal(inputs["pixel_values"][0][:tiles], batch["pixel_values"]), (width, height)


def test_newline_rows_carry_the_newline_embedding(towers):
    """Guard: the comparison sees the newline rows; a different image_newline changes LlavaNext's logits."""
    model = build(towers["clip"])
    llava = to_llava_next(model)  # in memory, sharing mm's tensors, fed mm's own pixels
    batch = model.collate([([user_message("describe", 1)], [WIDE])])
    ids = batch["input_ids"]
    rows = (ids == model.newline_id) & (ids.roll(1, -1) == model.image_token_id)  # ends of patch rows
    inputs = {"input_ids": ids.masked_fill(rows, model.image_token_id), "attention_mask": batch["attention_mask"],
              "pixel_values": batch["pixel_values"][None], "image_sizes": torch.tensor([[WIDE.height, WIDE.width]])}
    vocab = model.llm.get_input_embeddings().num_embeddings
    with torch.no_grad():
        ours = model(**batch).logits
        assert torch.allclose(ours, llava(**inputs).logits[..., :vocab], atol=1e-4, rtol=0)
        llava.model.image_newline.add_(1.0)
        assert (ours - llava(**inputs).logits[..., :vocab]).abs().max() > 1e-3
        # a caller that passes the tiles without image_index (the order they were encoded in) is refused
        with pytest.raises(MMError, match="rearranges image features .* needs image_index"):
            model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])


def test_export_tool_writes_llava_next(towers, tool_main, tmp_path, capsys):
    model = build(towers["clip"])
    model.save(tmp_path / "mm")
    assert tool_main("export_hf.py")(["--model", str(tmp_path / "mm"), "--out", str(tmp_path / "hf")]) == 0
    assert "wrote LLaVA-NeXT checkpoint" in capsys.readouterr().out
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in (tmp_path / "hf").iterdir()}
    assert set(modes.values()) == {"0o644"}, modes
    image_processor = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert (image_processor["image_processor_type"], image_processor["processor_class"]) == (
        "LlavaNextImageProcessor", "LlavaNextProcessor")
    assert image_processor["image_grid_pinpoints"] == [[64, 32], [32, 64], [64, 64], [32, 96], [96, 32]]
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [
        "LlavaNextForConditionalGeneration"]
    llava = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    assert check_same(mm.load(tmp_path / "mm"), llava, processor, [user_message("describe", 1)], [TALL]) <= 1e-4


def test_export_tool_refuses_the_tiles_arrangement_in_one_line(towers, tool_main, tmp_path, capsys):
    build(towers["clip"], layout={"name": "anyres", "max_image_tokens": 200}).save(tmp_path / "mm")
    capsys.readouterr()
    assert tool_main("export_hf.py")(["--model", str(tmp_path / "mm"), "--out", str(tmp_path / "hf")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["mm: error: model is not exportable to LlavaNext: layout anyres arrangement 'tiles' differs "
                     "from LlavaNext's token order (base image, then the unpadded grid's patch rows, each followed "
                     "by a newline; train with arrangement llava_next); layout anyres max_image_tokens has no "
                     "LlavaNext equivalent (LlavaNext always takes the best grid)"]
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("change,message", [
    ({"layout": "dynamic"}, "model is not exportable to LLaVA: layout 'dynamic' has no LLaVA or LlavaNext "
                            "equivalent (exportable layouts: anyres -> LlavaNext, fixed -> LLaVA)"),
    ({"adapter": "pool"}, "model is not exportable to LlavaNext: adapter 'pool' has no LLaVA equivalent "
                          "(exportable adapters: linear, mlp)"),
    ({"encoder": "tiny-vit"}, "model is not exportable to LlavaNext: encoder 'tiny-vit' has no LLaVA equivalent "
                              "(exportable encoders: hf)"),
    ({"moe": mm.MoEConfig()}, "model is not exportable to LlavaNext: modality experts (moe) inside the LLM have "
                              "no LLaVA equivalent"),
])
def test_refusals_name_why(change, message):
    config = mm.ModelConfig(**{"encoder": "hf:/nowhere", "adapter": "mlp", "layout": LAYOUT, **change})
    with pytest.raises(MMError) as error:
        check_exportable(config)
    assert str(error.value) == message


def test_refuses_an_mlp_wider_than_the_llm(towers, tmp_path):
    model = build(towers["clip"], adapter={"name": "mlp", "hidden": 48})
    with pytest.raises(MMError, match="mlp adapter hidden width 48 differs from the LLM width 64"):
        export_llava_next(model, tmp_path)
    assert not any(tmp_path.iterdir())
