"""The GPU benchmark's parts, run on CPU: the training-step MFU at a tiny size, and the stand-in LLM writer.

``tools.bench`` is imported from the repository root (``python -m pytest`` run there puts it on the path)."""
import json

import pytest
import torch

from tools.bench import stand_in_llm as stand_in
from tools.bench import train_gpu


def test_train_mfu_runs_a_real_step_and_counts_flops():
    result = train_gpu.run(quick=True, device="cpu", size="tiny", compile=False)
    assert 0 < result["mfu"] < 1 and result["mfu_with_attention"] > result["mfu"]
    assert result["tokens_per_step"] == result["rows"] * result["seq"] == 32
    seconds = result["step_s"]["eager"]
    llm_params = result["llm_params_m"] * 1e6
    assert result["mfu"] == pytest.approx(6 * llm_params * 32 / seconds / (result["peak_fp32_tflops"] * 1e12))
    assert result["best"] == "eager" and "compile_error" not in result


def test_stand_in_has_the_shapes_and_tokenizer_of_the_original(tmp_path, tiny_model):
    like = tmp_path / "like"
    tiny_model.llm.save_pretrained(like)
    tiny_model.tokenizer.save_pretrained(like)
    for weights in like.glob("*.safetensors"):
        weights.unlink()  # only the config and tokenizer are needed
    out = tmp_path / "out"
    assert stand_in.main(["--like", str(like), "--out", str(out), "--seed", "7"]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    original = {k: v.shape for k, v in tiny_model.llm.state_dict().items()}
    assert {k: v.shape for k, v in model.state_dict().items()} == original
    assert not torch.equal(model.get_input_embeddings().weight, tiny_model.llm.get_input_embeddings().weight)
    assert AutoTokenizer.from_pretrained(out)("a cat")["input_ids"] == tiny_model.tokenizer("a cat")["input_ids"]
    assert (out / stand_in.MARKER).is_file()
    assert json.loads((out / "config.json").read_text())["hidden_size"] == tiny_model.llm.config.hidden_size


def test_stand_in_refuses_to_overwrite_real_weights(tmp_path, tiny_model, capsys):
    real = tmp_path / "real"
    tiny_model.llm.save_pretrained(real)
    before = sorted((p.name, p.stat().st_size) for p in real.iterdir())
    assert stand_in.main(["--like", str(real), "--out", str(real)]) == 2
    assert "already holds real weights" in capsys.readouterr().err
    assert sorted((p.name, p.stat().st_size) for p in real.iterdir()) == before
    assert stand_in.main(["--like", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
