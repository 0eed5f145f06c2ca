"""Import of a LLaVA checkpoint made by transformers alone (not by mm): same tokens, logits and generation."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import (
    AutoProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    SiglipVisionConfig,
)

import mm
from mm.errors import MMError
from mm.interop import import_llava
from mm.llm.tiny import build_tiny

# Renders string content like ChatML and content parts natively (as llava-hf processors' templates do).
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
             patch_size=8)


def save_llava(directory, vision_config, **overrides) -> LlavaForConditionalGeneration:
    """A random LLaVA (full 3-layer tower, tied LM head, bias-free projector) with a processor, saved."""
    _, tokenizer = build_tiny("llama")
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    text_config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                              pad_token_id=0, eos_token_id=2, bos_token_id=None)
    settings = dict(vision_config=vision_config, text_config=text_config, vision_feature_layer=-2,
                    image_token_index=tokenizer.convert_tokens_to_ids("<image>"), multimodal_projector_bias=False,
                    image_seq_length=16)
    config = LlavaConfig(**{**settings, **overrides})
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for parameter in model.model.multi_modal_projector.parameters():
            parameter.normal_(std=0.5)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 2, 0
    model.save_pretrained(directory)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8, chat_template=TEMPLATE,
                   vision_feature_select_strategy=config.vision_feature_select_strategy,
                   num_additional_image_tokens=1).save_pretrained(directory)
    return model


def test_import_matches_llava_and_is_self_contained(tmp_path, picture):
    llava = save_llava(tmp_path / "hf", CLIPVisionConfig(**TOWER))
    import_llava(tmp_path / "hf", tmp_path / "mm")
    shutil.move(tmp_path / "mm", tmp_path / "moved")  # the directory must not depend on where it was written
    model = mm.load(tmp_path / "moved")
    assert (model.config.adapter.name, model.config.encoder.options.select_layer, model.tokens_per_image) == \
        ("mlp", -2, 16)
    assert model.image_token_id == llava.config.image_token_index

    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this"}]}]
    batch = model.collate([(messages, picture[:1])])
    inputs = processor(images=picture[:1], text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       return_tensors="pt")
    assert inputs["input_ids"].tolist() == batch["input_ids"].tolist()
    with torch.no_grad():
        difference = (model(**batch).logits - llava(**inputs).logits).abs().max()
    assert difference <= 1e-4
    output = llava.generate(**inputs, max_new_tokens=10, do_sample=False)
    expected = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    assert model.generate(images=picture[:1], messages=messages, max_new_tokens=10) == expected

    # an ordinary mm model: trains (adapter gets gradients, frozen LLM does not), saves and loads again
    model.adapter.requires_grad_(True)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == model.image_token_id, -100)
    model(**batch, labels=labels).loss.backward()
    assert model.adapter.mlp[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.llm.parameters())
    model.save(tmp_path / "again")
    again = mm.load(tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, model(**batch).logits)


def test_import_refuses_what_mm_cannot_reproduce(tmp_path, tool_main, capsys):
    save_llava(tmp_path / "siglip", SiglipVisionConfig(**TOWER), vision_feature_select_strategy="default")
    assert tool_main("import_hf.py")(["--hf", str(tmp_path / "siglip"), "--out", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("mm: error: ") and "vision_feature_select_strategy 'default' on a " \
        "siglip_vision_model tower" in message
    assert not (tmp_path / "out").exists()

    config = json.loads((tmp_path / "siglip" / "config.json").read_text())
    config.update(vision_feature_layer=[-2, -1], projector_hidden_act="relu")
    (tmp_path / "siglip" / "config.json").write_text(json.dumps(config))
    with pytest.raises(MMError, match=r"concatenates several layers.*projector_hidden_act 'relu'"):
        import_llava(tmp_path / "siglip", tmp_path / "out")
    with pytest.raises(MMError, match="not a transformers model directory"):
        import_llava(tmp_path / "nothing", tmp_path / "out")
