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

# The files through which transformers' Auto* classes import code named by ``auto_map``.
CODE_CONFIG_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
                     "video_preprocessor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def brief(exc: BaseException) -> str:
    """An exception as one short line: its type and the first 300 characters of its message."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def read_json_object(path: Path) -> dict:
    """The JSON object in ``path``; MMError (one line) when it is unreadable, not JSON or not an object."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise MMError(f"cannot read {path}: {brief(exc)}") from None
    if not isinstance(data, dict):
        raise MMError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def refuse_remote_code(directory: Path) -> None:
    """MMError if a transformers config file in ``directory`` asks for code from the directory (``auto_map``).

    Every loader also passes ``trust_remote_code=False``; this check makes the refusal one clear line before
    transformers reads anything, also where transformers would quietly use its own class instead (a model type it
    knows), so a directory that asks for code is never half-honoured."""
    for name in CODE_CONFIG_FILES:
        path = directory / name
        if path.exists() and "auto_map" in read_json_object(path):
            raise MMError(f"{path} asks for custom code (auto_map); mm never runs code from a model directory")


def rebuild_from_config(directory: Path) -> PreTrainedModel:
    """A randomly initialised causal LM from a saved ``config.json`` (the weights are loaded afterwards)."""
    if not (directory / "config.json").is_file():
        raise MMError(f"LLM directory {directory} has no config.json")
    refuse_remote_code(directory)
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    except MMError:
        raise
    except Exception as exc:  # a stranger's config: any failure to build from it is their mistake, in one line
        raise MMError(f"cannot build the LLM of {directory / 'config.json'}: {brief(exc)}") from None


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerBase:
    """A transformers tokenizer from a local directory, never running code from it (one line on any failure)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MMError(f"tokenizer directory not found: {directory}")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise MMError(f"{directory} holds no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    refuse_remote_code(directory)
    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except Exception as exc:  # garbage JSON, a missing vocabulary, an unknown tokenizer class
        raise MMError(f"cannot load the tokenizer in {directory}: {brief(exc)}") from None


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
    """A causal LM and tokenizer from a local transformers directory; safetensors weights only. Under
    ``torch.device("meta")`` the architecture alone, from ``config.json`` (checks that need no weights)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise MMError(f"LLM directory {path} has no config.json")
    if not any(path.glob("*.safetensors")):
        raise MMError(f"LLM directory {path} holds no .safetensors weights (pickled weights are never loaded)")
    refuse_remote_code(path)
    tokenizer = load_tokenizer(path)
    if torch.get_default_device().type == "meta":
        return rebuild_from_config(path), prepare_tokenizer(tokenizer)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype="float32",
                                                     trust_remote_code=False)
    except Exception as exc:  # a config or weights that do not fit: one line naming the directory
        raise MMError(f"cannot load the LLM in {path}: {brief(exc)}") from None
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
