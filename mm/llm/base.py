"""LLM registry: a builder returns a transformers causal LM and its tokenizer; ``rebuild`` gives the skeleton of a
saved one (its ``llm/config.json``) so loading goes through the family that built it.

Nothing read from a model directory may run code: ``trust_remote_code`` is always off, and a config that asks
for custom code (``auto_map``) is refused with one line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mm.errors import MMError
from mm.registry import Registry



def refuse_remote_code(directory: Path) -> None:
    """MMError if ``directory/config.json`` asks transformers to import code from the directory (``auto_map``)."""
    path = directory / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MMError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise MMError(f"{path} must hold a JSON object")
    if "auto_map" in data:
        raise MMError(f"{path} asks for custom code (auto_map); mm never runs code from a model directory")


def rebuild_from_config(directory: Path) -> PreTrainedModel:
    """A randomly initialised causal LM from a saved ``config.json`` (the weights are loaded afterwards)."""
    refuse_remote_code(directory)
    config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)


class LLMRegistry(Registry):
    """The LLM families. ``register(name, rebuild=fn)`` may give a family its own skeleton builder."""

    def rebuild(self, spec: str, directory: Path) -> PreTrainedModel:
        rebuild: Callable = self.entry(spec).extras.get("rebuild", rebuild_from_config)
        return rebuild(directory)


LLMS = LLMRegistry("llm")

# ChatML, used for tokenizers that ship no chat template (GPT-2, the tiny test tokenizer).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a tokenizer what generation and batching need: a pad token and a chat template."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def load_local(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and tokenizer from a local transformers directory; safetensors weights only."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise MMError(f"LLM directory {path} has no config.json")
    if not any(path.glob("*.safetensors")):
        raise MMError(f"LLM directory {path} holds no .safetensors weights (pickled weights are never loaded)")
    refuse_remote_code(path)
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype="float32", trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    return model, prepare_tokenizer(tokenizer)


def example(workdir: Path) -> dict:
    """A tiny random Llama with the tiny test tokenizer, saved under ``workdir``."""
    from mm.llm.tiny import build_tiny

    model, tokenizer = build_tiny("llama")
    path = Path(workdir) / "hf-tiny-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return {"name": f"hf:{path}"}


@LLMS.register("hf", example=example)
def build_hf(arg: str | None, options) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``hf:<local dir>``: any transformers causal LM saved with ``save_pretrained``."""
    if not arg:
        raise MMError("llm 'hf' needs a directory: hf:/path/to/model")
    return load_local(arg)
