"""Export an mm model to a transformers LLaVA directory (``LlavaForConditionalGeneration`` + ``LlavaProcessor``).

The layout picks the target (``export_target``): ``fixed`` declares ``llava``; ``anyres`` declares ``llava_next``
and goes through ``mm.interop.llava_next_export``, which shares the checks and weight mapping below.

Mapping (exact: same logits, same greedy generation):
- vision tower: mm's ``hf:`` encoder is a CLIP/SigLIP vision model already cut after ``select_layer``; it is
  exported with ``num_hidden_layers`` = the layers it kept and ``vision_feature_layer = -1``, which selects the
  same hidden state as ``select_layer`` on the uncut tower (the cut layers' weights are not in an mm model).
- prefix tokens: mm's adapters drop the encoder's prefix tokens. CLIP (1 CLS token) -> strategy ``default``
  (LLaVA drops the first token); SigLIP (none) -> ``full``.
- ``mlp`` adapter -> ``multi_modal_projector.linear_1 -> gelu -> linear_2`` (hidden must be the LLM width).
  ``linear`` adapter -> ``linear_1`` = the adapter, ``projector_hidden_act = "linear"`` (identity) and
  ``linear_2`` = identity matrix with zero bias (exact in floating point).
- LLM: ``model.language_model`` = the causal LM's base model, ``lm_head`` = its output layer.
- ``image_token_index`` = mm's ``<image>`` id. mm never embeds that id; when it lies beyond the LLM's
  vocabulary the exported embedding (and head) get zero rows up to it, and ``generation_config.suppress_tokens``
  keeps generation from choosing them (mm's LLM cannot produce them either). The first ``vocab`` logit
  columns equal mm's.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from mm.config import ModelConfig
from mm.errors import MMError
from mm.interop.chat_template import with_content_parts
from mm.parts import registry
from mm.registry import split_spec

CAPABILITY = "llava"  # what an encoder / adapter part declares when it maps onto LLaVA's tower / projector
# what a layout declares when its token stream is that of a transformers model class: the export's target
TARGETS = {"llava": "LLaVA", "llava_next": "LlavaNext"}


def export_target(config: ModelConfig) -> str:
    """The transformers family a model with this config exports to: ``llava_next`` when its layout declares it
    (anyres), else ``llava``."""
    return "llava_next" if registry("layout").entry(config.layout.name).supports("llava_next") else "llava"


def config_problems(config: ModelConfig) -> list[str]:
    """Why a model with this config cannot become a LLaVA / LlavaNext checkpoint (empty when it may)."""
    problems = []
    for kind in ("encoder", "adapter"):
        part = getattr(config, kind)
        if not registry(kind).entry(part.name).supports(CAPABILITY):
            able = [n for n in registry(kind).names() if registry(kind).entry(n).supports(CAPABILITY)]
            problems.append(f"{kind} {part.name!r} has no LLaVA equivalent (exportable {kind}s: {', '.join(able)})")
    layouts = registry("layout")
    entry = layouts.entry(config.layout.name)
    if not any(entry.supports(target) for target in TARGETS):
        able = [f"{n} -> {TARGETS[t]}" for n in layouts.names() for t in TARGETS if layouts.entry(n).supports(t)]
        problems.append(f"layout {config.layout.name!r} has no LLaVA or LlavaNext equivalent (exportable layouts: "
                        f"{', '.join(able)})")
    elif entry.supports("llava_next"):  # the layout's options decide (its own llava_next_problems)
        problems += entry.builder(split_spec(config.layout.name)[1], config.layout.options).llava_next_problems()
    if config.moe is not None:
        problems.append("modality experts (moe) inside the LLM have no LLaVA equivalent")
    return problems


def model_problems(model) -> list[str]:
    """The config's problems, then what the built parts themselves report (``llava_problems``)."""
    problems = config_problems(model.config)
    llm = model.llm
    if problems:
        return problems
    problems += model.encoder.llava_problems()
    problems += model.adapter.llava_problems(llm.config.hidden_size)
    if model.moe is not None:
        problems.append("modality experts (moe) inside the LLM have no LLaVA equivalent")
    head = llm.get_output_embeddings()
    names = {f"{llm.base_model_prefix}.{k}" for k in llm.base_model.state_dict()}
    head_name = next((n for n, m in llm.named_modules() if m is head), None)
    if head is None or head_name is None or getattr(head, "bias", None) is not None:
        problems.append(f"the LLM {type(llm).__name__} has no bias-free output layer")
    else:
        names |= {f"{head_name}.{k}" for k in head.state_dict()}
        extra = sorted(set(llm.state_dict()) - names)
        if extra:
            problems.append(f"the LLM {type(llm).__name__} holds weights outside its base model and head "
                            f"(e.g. {extra[0]})")
    return problems


def check_exportable(config_or_model) -> None:
    """Raise MMError naming every part that keeps the model from becoming a LLaVA (or, with an ``anyres``
    layout, LlavaNext) checkpoint."""
    config = config_or_model if isinstance(config_or_model, ModelConfig) else config_or_model.config
    problems = config_problems(config) if config is config_or_model else model_problems(config_or_model)
    if problems:
        raise MMError(f"model is not exportable to {TARGETS[export_target(config)]}: " + "; ".join(problems))


def _tower_layers(tower: nn.Module) -> int:
    return len(getattr(tower, "vision_model", tower).encoder.layers)


def llava_config(model, config_class=None, **extra):
    """The LlavaConfig (or ``config_class``, e.g. LlavaNextConfig, with ``extra`` fields) equivalent to
    ``model`` (an exportable one)."""
    from transformers import LlavaConfig

    encoder = model.encoder
    vision_config = copy.deepcopy(encoder.model.config)
    vision_config.num_hidden_layers = _tower_layers(encoder.model)  # the tower ends at select_layer
    text_config = copy.deepcopy(model.llm.config)
    vocab = model.llm.get_input_embeddings().num_embeddings
    text_config.vocab_size = max(vocab, model.image_token_id + 1)
    return (config_class or LlavaConfig)(
        **extra,
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=model.image_token_id,
        image_seq_length=model.tokens_per_image,
        projector_hidden_act=model.adapter.llava_projector(text_config.hidden_size)[0],
        vision_feature_layer=-1,
        vision_feature_select_strategy="default" if encoder.num_prefix_tokens == 1 else "full",
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
        dtype=model.dtype,
    )


def _pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    if rows == weight.shape[0]:
        return weight.detach()
    extra = weight.new_zeros(rows - weight.shape[0], *weight.shape[1:])
    return torch.cat([weight.detach(), extra])


def to_llava(model):
    """A ``LlavaForConditionalGeneration`` holding ``model``'s weights, in ``model``'s dtype.

    It shares the tensors of ``model`` (no second copy of a large model; no random init to overwrite), so
    changing one in place changes the other.
    """
    from transformers import LlavaForConditionalGeneration

    check_exportable(model)
    if export_target(model.config) != "llava":
        raise MMError(f"layout {model.config.layout.name!r} exports to LlavaNext (export_llava_next), not LLaVA")
    return with_weights(model, LlavaForConditionalGeneration, llava_config(model))


def with_weights(model, model_class, config):
    """``model_class(config)`` (Llava or LlavaNext) built without initialisation, holding ``model``'s tower,
    projector and LLM tensors (shared, not copied) and its generation settings."""
    from transformers import GenerationConfig
    from transformers.initialization import no_init_weights

    with no_init_weights():
        llava = model_class(config).to(model.dtype).eval()
    llm = model.llm
    rows = config.text_config.vocab_size

    result = llava.model.vision_tower.load_state_dict(model.encoder.model.state_dict(), strict=False, assign=True)
    leftover = [k for k in result.missing_keys if "post_layernorm" not in k]
    if leftover or result.unexpected_keys:
        raise MMError(f"vision tower weights do not map onto LLaVA's: missing {leftover[:3]}, "
                      f"unexpected {result.unexpected_keys[:3]}")
    with torch.no_grad():  # unused by LLaVA (it reads hidden states); set to identity for determinism
        for name, tensor in llava.model.vision_tower.named_parameters():
            if "post_layernorm" in name:
                tensor.fill_(1.0 if name.endswith("weight") else 0.0)

    embedding = llm.get_input_embeddings().weight
    base = {}
    for name, tensor in llm.base_model.state_dict(keep_vars=True).items():
        base[name] = _pad_rows(tensor, rows) if tensor is embedding else tensor.detach()
    llava.model.language_model.load_state_dict(base, strict=True, assign=True)
    head = llm.get_output_embeddings().weight
    llava.lm_head.load_state_dict({"weight": _pad_rows(head, rows)}, strict=True, assign=True)
    projector = model.adapter.llava_projector(llm.config.hidden_size)[1]
    llava.model.multi_modal_projector.load_state_dict(projector, strict=True, assign=True)
    if config.tie_word_embeddings:
        llava.tie_weights()

    generation = copy.deepcopy(llm.generation_config) if llm.generation_config else GenerationConfig()
    generation.eos_token_id = model.tokenizer.eos_token_id
    generation.pad_token_id = model.tokenizer.pad_token_id
    vocab = embedding.shape[0]
    if rows > vocab:
        generation.suppress_tokens = list(range(vocab, rows))
    llava.generation_config = generation
    return llava


def llava_processor(model, processor_class=None, image_processor=None):
    """A ``LlavaProcessor`` that tokenises and expands ``<image>`` exactly as ``model.tokenize`` does (or
    ``processor_class``, e.g. LlavaNextProcessor, with that ``image_processor``)."""
    from transformers import LlavaProcessor

    encoder = model.encoder
    tokenizer = copy.deepcopy(model.tokenizer)
    template = tokenizer.chat_template
    return (processor_class or LlavaProcessor)(
        image_processor=image_processor or encoder.processor,
        tokenizer=tokenizer,
        patch_size=encoder.model.config.patch_size,
        vision_feature_select_strategy="default" if encoder.num_prefix_tokens == 1 else "full",
        num_additional_image_tokens=encoder.num_prefix_tokens,
        chat_template=with_content_parts(template) if isinstance(template, str) else None,
        image_token=model.tokenizer.convert_ids_to_tokens(model.image_token_id),
    )


def export_llava(model, out: str | Path, max_shard_size: str | int = "4GB") -> Path:
    """Write ``model`` as a transformers LLaVA directory that ``from_pretrained`` loads in transformers 5.x and
    4.45+ (and vLLM / SGLang serve): the files of ``save_pretrained``, in the layout of the hub's llava-hf
    checkpoints (:func:`write_v4_conventions`), every file mode 0644."""
    return write_export(to_llava(model), llava_processor(model), out, max_shard_size)


def write_export(hf_model, processor, out: str | Path, max_shard_size: str | int) -> Path:
    """``save_pretrained`` of both, rewritten into the 4.x conventions, every file mode 0644."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out, max_shard_size=max_shard_size)
    processor.save_pretrained(out)
    write_v4_conventions(out, type(processor).__name__)
    for path in out.iterdir():
        if path.is_file():
            path.chmod(0o644)  # safetensors are written 0600; a server often runs as another user
    return out


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_v4_conventions(out: Path, processor_class: str = "LlavaProcessor") -> None:
    """Rewrite what transformers 5 saved into the conventions 4.x reads too (5.x reads both):

    - weights named as the hub's llava-hf checkpoints: ``vision_tower.vision_model.*`` (5.x drops
      ``vision_model.``), ``language_model.model.*``, ``language_model.lm_head.*``, ``multi_modal_projector.*``;
    - ``preprocessor_config.json`` (the image processor) and a flat ``processor_config.json`` (5.x nests the image
      processor inside it, which 4.x passes to the processor as a second ``image_processor``);
    - ``chat_template.json`` beside ``chat_template.jinja`` (4.45-4.4x read only the JSON form);
    - ``tokenizer_config.json``: ``PreTrainedTokenizerFast`` (5.x writes ``TokenizersBackend``, unknown to 4.x)
      and ``model_input_names`` without ``token_type_ids`` (which 4.x's ``generate`` rejects);
    - ``config.json``: ``torch_dtype`` beside 5.x's ``dtype``.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    def v4_name(name: str) -> str:
        if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
            return "vision_tower.vision_model." + name.removeprefix("vision_tower.")
        return name

    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(shard, "pt") as weights:
            if all(v4_name(name) == name for name in weights.keys()):
                continue
            tensors = {v4_name(name): weights.get_tensor(name) for name in weights.keys()}
        save_file(tensors, shard, metadata={"format": "pt"})
    index = out / "model.safetensors.index.json"
    if index.is_file():
        data = _read_json(index)
        data["weight_map"] = {v4_name(name): file for name, file in data["weight_map"].items()}
        _write_json(index, data)

    processor = _read_json(out / "processor_config.json")
    image_processor = processor.pop("image_processor", None)
    if image_processor is not None:
        _write_json(out / "preprocessor_config.json", {**image_processor, "processor_class": processor_class})
        _write_json(out / "processor_config.json", processor)
    template = out / "chat_template.jinja"
    if template.is_file():
        _write_json(out / "chat_template.json", {"chat_template": template.read_text()})
    tokenizer = _read_json(out / "tokenizer_config.json")
    tokenizer.update(tokenizer_class="PreTrainedTokenizerFast", model_input_names=["input_ids", "attention_mask"])
    _write_json(out / "tokenizer_config.json", tokenizer)
    config = _read_json(out / "config.json")
    if "dtype" in config:
        config["torch_dtype"] = config["dtype"]
        _write_json(out / "config.json", config)
