"""Import a transformers LLaVA directory as an ordinary, self-contained mm model directory.

The reverse of ``llava_export``: the vision tower becomes an ``hf:`` encoder (``select_layer`` =
``vision_feature_layer``), the projector an ``mlp`` adapter (``gelu``) or a ``linear`` one (``linear``
activation: ``linear_2 @ linear_1`` folded into one layer, exact when ``linear_2`` is the identity, as mm
exports it), the language model + ``lm_head`` a transformers causal LM. The result loads with ``mm.load`` and
serves as ``init_from`` for any recipe.

Written into ``out``: the usual mm files, including ``encoder/`` (the tower's config and image processor, no
weights), from which ``mm.load`` rebuilds the tower skeleton, so the directory is self-contained. The LLM's
weights live in ``model.safetensors`` like every mm model's; the config's ``llm`` spec only records provenance.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from mm.compose import DTYPES
from mm.config import ModelConfig
from mm.errors import MMError

VISION_TYPES = {"clip_vision_model": 1, "siglip_vision_model": 0}  # model_type -> prefix tokens mm drops


def _read_config(hf_dir: Path):
    from transformers import AutoConfig

    from mm.llm.base import read_json_object, refuse_remote_code

    if not (hf_dir / "config.json").is_file():
        raise MMError(f"{hf_dir} is not a transformers model directory (no config.json)")
    model_type = read_json_object(hf_dir / "config.json").get("model_type")
    if model_type != "llava":
        raise MMError(f"{hf_dir} holds a {model_type!r} model; only 'llava' checkpoints are imported")
    if not any(hf_dir.glob("*.safetensors")):
        raise MMError(f"{hf_dir} holds no .safetensors weights (pickled weights are never loaded)")
    refuse_remote_code(hf_dir)  # config, tokenizer and image processor files: no auto_map
    return AutoConfig.from_pretrained(hf_dir, trust_remote_code=False)


def import_problems(config) -> list[str]:
    """Why this LlavaConfig has no exact mm equivalent (empty when it has)."""
    problems = []
    vision_type = config.vision_config.model_type
    if vision_type not in VISION_TYPES:
        problems.append(f"vision tower {vision_type!r} is not one of {', '.join(VISION_TYPES)}")
    elif config.vision_feature_select_strategy != ("default" if VISION_TYPES[vision_type] else "full"):
        problems.append(f"vision_feature_select_strategy {config.vision_feature_select_strategy!r} on a "
                        f"{vision_type} tower: mm drops exactly the tower's prefix tokens "
                        f"({VISION_TYPES[vision_type]})")
    if not isinstance(config.vision_feature_layer, int):
        problems.append(f"vision_feature_layer {config.vision_feature_layer} concatenates several layers; "
                        f"mm's hf encoder takes one")
    if config.projector_hidden_act not in ("gelu", "linear"):
        problems.append(f"projector_hidden_act {config.projector_hidden_act!r}: mm's mlp adapter uses gelu")
    return problems


def _split_llm(llava, text_config):
    """A causal LM (AutoModelForCausalLM of ``text_config``) holding LLaVA's language model and head."""
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_config(text_config, dtype=torch.float32, trust_remote_code=False)
    llm.base_model.load_state_dict(llava.model.language_model.state_dict(), strict=True)
    llm.get_output_embeddings().load_state_dict(llava.lm_head.state_dict(), strict=True)
    if getattr(text_config, "tie_word_embeddings", False):
        llm.tie_weights()
    return llm


def _adapter_state(projector, adapter: str) -> dict[str, torch.Tensor]:
    one, two = projector.linear_1, projector.linear_2

    def bias(layer):
        return layer.bias if layer.bias is not None else torch.zeros(layer.out_features)

    if adapter == "mlp":
        return {"mlp.0.weight": one.weight, "mlp.0.bias": bias(one), "mlp.2.weight": two.weight,
                "mlp.2.bias": bias(two)}
    return {"proj.weight": two.weight @ one.weight, "proj.bias": two.weight @ bias(one) + bias(two)}


def import_llava(hf_dir: str | Path, out: str | Path):
    """Convert the LLaVA checkpoint in ``hf_dir`` into an mm model saved at ``out``; returns the model."""
    import mm
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    from mm.llm.base import load_tokenizer

    hf_dir, out = Path(hf_dir), Path(out).resolve()
    config = _read_config(hf_dir)
    problems = import_problems(config)
    if problems:
        raise MMError(f"{hf_dir} cannot be imported exactly: " + "; ".join(problems))
    saved = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    dtype = saved if saved in DTYPES else "float32"
    llava = LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32, use_safetensors=True,
                                                          trust_remote_code=False).eval()
    tokenizer = load_tokenizer(hf_dir)
    if tokenizer.convert_tokens_to_ids("<image>") != config.image_token_index:
        raise MMError(f"{hf_dir}: the tokenizer's <image> id {tokenizer.convert_tokens_to_ids('<image>')} is not "
                      f"the model's image_token_index {config.image_token_index}")
    adapter = "mlp" if config.projector_hidden_act == "gelu" else "linear"

    with tempfile.TemporaryDirectory(prefix="mm-import-") as tmp:
        vision_dir, llm_dir = Path(tmp) / "vision", Path(tmp) / "llm"
        llava.model.vision_tower.save_pretrained(vision_dir)
        AutoImageProcessor.from_pretrained(hf_dir, trust_remote_code=False).save_pretrained(vision_dir)
        llm = _split_llm(llava, config.text_config)
        llm.generation_config = llava.generation_config
        llm.save_pretrained(llm_dir)
        tokenizer.save_pretrained(llm_dir)
        del llm
        model_config = ModelConfig(encoder={"name": f"hf:{vision_dir}", "select_layer": config.vision_feature_layer},
                                   adapter=adapter, llm=f"hf:{llm_dir}", dtype="float32")
        model = mm.build(model_config)
        if model.image_token_id != config.image_token_index:
            raise MMError(f"{hf_dir}: mm's <image> id {model.image_token_id} is not the model's "
                          f"image_token_index {config.image_token_index}")
        with torch.no_grad():
            model.adapter.load_state_dict(_adapter_state(llava.model.multi_modal_projector, adapter), strict=True)
        del llava
        model.config.encoder.name = f"hf:{out / 'encoder'}"
        model.config.llm.name = f"hf:{out / 'llm'}"  # provenance only: the weights are in model.safetensors
        model.config.dtype = dtype
        model.to(DTYPES[dtype])
        mm.save(model, out)  # writes encoder/ through the encoder's save_files
    return model
