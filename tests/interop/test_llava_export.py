"""Export to transformers LLaVA: same logits, same processor tokens, same greedy generation; refusals."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

import mm
from mm.errors import MMError
from mm.interop import export_llava
from mm.interop.llava_export import to_llava
from mm.prompt import user_message

PROMPTS = [
    ([user_message("describe the image", 1)], 1),
    ([{"role": "user", "content": [{"type": "text", "text": "compare "}, {"type": "image"},
                                   {"type": "text", "text": " and "}, {"type": "image"}]}], 2),
]


def check_equivalent(model: mm.MultimodalModel, hf_dir, images) -> None:
    llava = LlavaForConditionalGeneration.from_pretrained(hf_dir).eval()
    processor = AutoProcessor.from_pretrained(hf_dir)
    vocab = model.llm.get_input_embeddings().num_embeddings
    for messages, count in PROMPTS:
        batch = model.collate([(messages, images[:count])])
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=images[:count], text=text, return_tensors="pt")
        assert inputs["input_ids"].tolist() == batch["input_ids"].tolist()  # <image> expanded to the same count
        assert torch.equal(inputs["pixel_values"], batch["pixel_values"])
        with torch.no_grad():
            ours, theirs = model(**batch).logits, llava(**inputs).logits
        assert (ours - theirs[..., :vocab]).abs().max() <= 1e-4
        assert theirs.shape[-1] == max(vocab, model.image_token_id + 1)
        expected = model.generate(images=images[:count], messages=messages, max_new_tokens=10)
        output = llava.generate(**inputs, max_new_tokens=10, do_sample=False)
        answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
        assert answer == expected


@pytest.mark.parametrize("family,adapter", [("clip", "mlp"), ("siglip", "linear")])
def test_export_matches_llava(towers, build_model, family, adapter, tmp_path, picture):
    model = build_model(towers[family], adapter)
    export_llava(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["vision_feature_select_strategy"] == ("default" if family == "clip" else "full")
    assert config["vision_config"]["num_hidden_layers"] == 2  # select_layer -2 of 3 layers
    assert config["image_token_index"] == model.image_token_id
    check_equivalent(model, tmp_path, picture)
    batch = model.collate([(PROMPTS[0][0], picture[:1])])
    vocab = model.llm.get_input_embeddings().num_embeddings
    with torch.no_grad():  # the in-memory LLaVA (sharing mm's tensors) agrees too
        assert torch.equal(model(**batch).logits, to_llava(model)(**batch).logits[..., :vocab])


def test_export_tool_then_import_tool_round_trip(towers, build_model, run_tool, tool_main, tmp_path, picture):
    model = build_model(towers["clip"], "mlp")
    model.save(tmp_path / "mm")
    result = run_tool("export_hf.py", "--model", tmp_path / "mm", "--out", tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    check_equivalent(model, tmp_path / "hf", picture)

    assert tool_main("import_hf.py")(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back = mm.load(tmp_path / "back")
    assert (back.config.adapter.name, back.tokens_per_image, back.image_token_id) == ("mlp", 16, model.image_token_id)
    batch = model.collate([(PROMPTS[1][0], picture)])
    vocab = model.llm.get_input_embeddings().num_embeddings
    with torch.no_grad():
        difference = (model(**batch).logits - back(**batch).logits[..., :vocab]).abs().max()
    assert difference <= 1e-4


def test_refuses_config_level_problems_without_loading(tmp_path):
    with pytest.raises(MMError, match="encoder 'tiny-vit' has no LLaVA equivalent.*adapter 'pool' has no LLaVA.*moe"):
        from mm.interop import check_exportable

        check_exportable(mm.ModelConfig(encoder="tiny-vit", adapter="pool", moe=mm.MoEConfig()))


def test_refuses_mlp_hidden_width_and_interpolated_size(towers, tmp_path):
    torch.manual_seed(0)
    wide = mm.build(mm.ModelConfig(encoder=f"hf:{towers['clip']}", adapter={"name": "mlp", "hidden": 48}))
    with pytest.raises(MMError, match="mlp adapter hidden width 48 differs from the LLM width 64"):
        export_llava(wide, tmp_path)
    resized = mm.build(mm.ModelConfig(encoder={"name": f"hf:{towers['siglip']}", "image_size": 48}, adapter="mlp"))
    with pytest.raises(MMError, match="image_size 48 differs from the vision tower's 32"):
        export_llava(resized, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written on refusal


def test_export_tool_names_the_blocking_part(towers, tiny_model_dir, run_tool, tool_main, tmp_path, capsys):
    """Pool adapter (a real saved model, tool as a subprocess), timm encoder and MoE (saved configs, tool in
    process): one line naming the part, exit 2, nothing written."""
    torch.manual_seed(0)
    mm.build(mm.ModelConfig(encoder=f"hf:{towers['clip']}", adapter={"name": "pool", "size": 2})).save(tmp_path / "pool")
    result = run_tool("export_hf.py", "--model", tmp_path / "pool", "--out", tmp_path / "pool-hf")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("mm: error: model is not exportable to LLaVA: adapter 'pool' has no LLaVA "
                                     "equivalent (exportable adapters: linear, mlp)")
    assert not (tmp_path / "pool-hf").exists()
    capsys.readouterr()  # drop the build's progress output

    cases = {"timm": ({"encoder": "timm:resnet18"}, "encoder 'timm:resnet18' has no LLaVA equivalent \\(exportable encoders: hf\\)"),
             "moe": ({"moe": {"ffn_experts": True}}, r"modality experts \(moe\) inside the LLM have no LLaVA")}
    for name, (change, message) in cases.items():
        shutil.copytree(tiny_model_dir, tmp_path / name)
        config = json.loads((tmp_path / name / "mm_config.json").read_text())
        config.update({"encoder": f"hf:{towers['clip']}", **change})
        (tmp_path / name / "mm_config.json").write_text(json.dumps(config))
        code = tool_main("export_hf.py")(["--model", str(tmp_path / name), "--out", str(tmp_path / f"{name}-hf")])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1, lines
        assert lines[0].startswith("mm: error: model is not exportable to LLaVA: ") and re.search(message, lines[0])
        assert not (tmp_path / f"{name}-hf").exists()
