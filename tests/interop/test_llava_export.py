"""Export to transformers LLaVA: same logits, same processor tokens, same greedy generation; refusals."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

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


LLAVA_HF_PREFIXES = ("vision_tower.vision_model.", "language_model.model.", "language_model.lm_head.",
                     "multi_modal_projector.")


def test_export_writes_the_files_transformers_4_reads_too(towers, build_model, tmp_path, picture):
    """Sharded, under a umask that would make files private: every file 0644, the llava-hf weight names, the 4.x
    processor / tokenizer / chat-template files; transformers 5 still loads it with the same logits and answers."""
    model = build_model(towers["clip"], "mlp")
    umask = os.umask(0o077)
    try:
        export_llava(model, tmp_path, max_shard_size="20KB")
    finally:
        os.umask(umask)
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in tmp_path.iterdir()}
    assert set(modes.values()) == {"0o644"}, modes
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1
    assert [name for name in weight_map if not name.startswith(LLAVA_HF_PREFIXES)] == []
    image_processor = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert (image_processor["image_processor_type"], image_processor["processor_class"]) == ("CLIPImageProcessor",
                                                                                             "LlavaProcessor")
    processor = json.loads((tmp_path / "processor_config.json").read_text())
    assert "image_processor" not in processor
    assert (processor["patch_size"], processor["vision_feature_select_strategy"], processor["image_token"],
            processor["num_additional_image_tokens"]) == (8, "default", "<image>", 1)
    template = json.loads((tmp_path / "chat_template.json").read_text())["chat_template"]
    assert template == (tmp_path / "chat_template.jinja").read_text()
    tokenizer = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tokenizer["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tokenizer["model_input_names"] == ["input_ids", "attention_mask"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "float32"
    check_equivalent(model, tmp_path, picture)


# transformers 4.x beside the venv's 5.x, without dependencies (the venv's torch serves both), one folder per version:
#   pip install --no-deps --target ~/.cache/mm/transformers4/4.57.6 transformers==4.57.6 "tokenizers==0.22.*" \
#       "huggingface_hub<1"     (4.47.1: tokenizers 0.21.*; 4.45.2: tokenizers 0.20.*)
# MM_TRANSFORMERS4 names another root. Each version found loads the exports in a subprocess.
V4_ROOT = Path(os.environ.get("MM_TRANSFORMERS4", Path.home() / ".cache" / "mm" / "transformers4"))
V4 = sorted((p for p in V4_ROOT.glob("4.*") if (p / "transformers").is_dir()),
            key=lambda p: tuple(int(x) for x in p.name.split(".")))
V4_CASES = [pytest.param(path, family, id=f"{path.name}-{family}") for path in V4 for family in ("clip", "siglip")
            # transformers 4.45-4.46 processors count a CLS token the SigLIP tower does not have (docs/interop.md)
            if family == "clip" or tuple(int(x) for x in path.name.split(".")[:2]) >= (4, 47)]
V4_SCRIPT = """
import json, sys, torch, transformers
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
model = LlavaForConditionalGeneration.from_pretrained(sys.argv[1]).eval()
processor = AutoProcessor.from_pretrained(sys.argv[1])
text = processor.apply_chat_template(json.loads(sys.argv[2]), add_generation_prompt=True)
inputs = processor(images=[Image.open(sys.argv[3])], text=text, return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
    output = model.generate(**inputs, max_new_tokens=10, do_sample=False)
answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
print(json.dumps({"version": transformers.__version__, "input_ids": inputs["input_ids"].tolist(),
                  "pixel_values": inputs["pixel_values"].tolist(), "logits": logits.tolist(), "answer": answer}))
"""


@pytest.mark.parametrize("v4, family", V4_CASES or [pytest.param(None, None, marks=pytest.mark.skip(
    reason=f"no transformers 4.x under {V4_ROOT} (see the pip line above this test)"))])
def test_export_loads_in_transformers_4(towers, build_model, tmp_path, picture, v4, family):
    """A real transformers 4.x (its own process) loads the export: same tokens, pixels, logits and answer as mm."""
    model = build_model(towers[family], "mlp" if family == "clip" else "linear")
    export_llava(model, tmp_path / "hf")
    picture[0].save(tmp_path / "picture.png")
    messages = PROMPTS[0][0]
    env = {**os.environ, "PYTHONPATH": str(v4)}
    result = subprocess.run([sys.executable, "-c", V4_SCRIPT, str(tmp_path / "hf"), json.dumps(messages),
                             str(tmp_path / "picture.png")], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = json.loads(result.stdout.strip().splitlines()[-1])
    assert theirs["version"] == v4.name
    batch = model.collate([(messages, picture[:1])])
    assert theirs["input_ids"] == batch["input_ids"].tolist()
    pixels = torch.tensor(theirs["pixel_values"])  # 4.x image processors round once more (numpy): within an ulp
    assert pixels.shape == batch["pixel_values"].shape and (pixels - batch["pixel_values"]).abs().max() <= 1e-6
    vocab = model.llm.get_input_embeddings().num_embeddings
    with torch.no_grad():
        ours = model(**batch).logits
    assert (ours - torch.tensor(theirs["logits"])[..., :vocab]).abs().max() <= 1e-4
    assert theirs["answer"] == model.generate(images=picture[:1], messages=messages, max_new_tokens=10)
