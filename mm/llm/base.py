"""LLM registry: a builder returns a transformers causal LM and its tokenizer."""
from __future__ import annotations

from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mm.errors import MMError
from mm.registry import Registry

LLMS: Registry = Registry("llm")

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
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, prepare_tokenizer(tokenizer)


@LLMS.register("hf")
def build_hf(arg: str | None, config) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``hf:<local dir>``: any transformers causal LM saved with ``save_pretrained``."""
    if not arg:
        raise MMError("llm 'hf' needs a directory: hf:/path/to/model")
    return load_local(arg)
