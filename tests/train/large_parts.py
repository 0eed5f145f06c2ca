"""Architectures of the large recipes' local weight directories, as configs only (no weights, no download)."""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, Qwen2Config

from mm.compose import build_encoder

LLMS = {
    "vicuna-7b-v1.5": lambda: LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                          num_attention_heads=32, vocab_size=32000),
    "Qwen2.5-7B-Instruct": lambda: Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                               num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
    "TinyLlama-1.1B-Chat-v1.0": lambda: LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                                    num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
}
TOWERS = {
    "clip-vit-large-patch14-336": lambda: CLIPVisionConfig(hidden_size=1024, intermediate_size=4096,
                                                           num_hidden_layers=24, num_attention_heads=16,
                                                           image_size=336, patch_size=14, projection_dim=768),
}


def llm_config(part):
    return LLMS[Path(part.name.partition(":")[2]).name]()


def vision_tower(model_config):
    """The recipe's encoder built without weights; ``hf:`` towers from a config written to a temp dir."""
    family, _, arg = model_config.encoder.name.partition(":")
    if family != "hf":
        return build_encoder(model_config, pretrained=False)
    directory = Path(tempfile.mkdtemp(prefix="mm-large-"))
    TOWERS[Path(arg).name]().save_pretrained(directory)
    return build_encoder(model_config, pretrained=False, saved=directory)


def meta_model(model_config):
    """The architecture of ``model_config`` (a large recipe's) with every tensor on the meta device: configs only,
    no weights; layout, tile size and token ids as the real model has them."""
    from transformers import AutoModelForCausalLM

    import mm.adapters  # noqa: F401  (registration)
    from mm.compose import assemble
    from mm.llm.base import prepare_tokenizer
    from mm.llm.tiny import tiny_tokenizer

    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(llm_config(model_config.llm))
        encoder = vision_tower(model_config)
    # a copy: assemble adds <image> to the tokenizer, and the cached one is shared by every tiny build
    return assemble(model_config, encoder, llm, prepare_tokenizer(copy.deepcopy(tiny_tokenizer())))
