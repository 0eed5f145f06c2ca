"""Random-init tiny causal LMs with a small real BPE tokenizer, registered like real LLMs for tests.

``tiny-llama``, ``tiny-qwen2``, ``tiny-mistral``, ``tiny-phi3`` (fused qkv projection), ``tiny-gpt2`` and
``tiny-opt`` (FFN as fc1/fc2 on the decoder layer, learned positions) share one byte-level BPE tokenizer trained
here on a fixed corpus, so every test uses real tokenisation and a real ChatML chat template.
"""
from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from mm.llm.base import CHATML_TEMPLATE, LLMS

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 1024

_CORPUS = """
a an the this that these those is are was were be has have had do does did not no yes and or but of in on at to from
with without by for as it its there here what which who where when how why many much one two three four five six seven
eight nine ten zero red green blue yellow orange purple black white gray grey brown pink cyan magenta color colour
circle square triangle rectangle star shape shapes big small large tiny left right top bottom middle center centre
above below next near far image picture photo shows contains there are is a of the describe question answer user
assistant system you are a helpful ai assistant please tell me about count how many objects word text reads says
""" * 4 + "".join(f" {i} " for i in range(200))


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE tokenizer (vocab 1024) with a ChatML template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.split("\n"), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _tiny_config(family: str, vocab: int):
    common = dict(vocab_size=vocab, pad_token_id=0, eos_token_id=2, bos_token_id=None, tie_word_embeddings=False)
    if family == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=2048, **common)
    if family == "opt":
        return OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                         word_embed_proj_dim=64, max_position_embeddings=2048, **common)
    sizes = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    configs = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "phi3": Phi3Config}
    return configs[family](**sizes, **common)


def build_tiny(family: str):
    tokenizer = tiny_tokenizer()
    # A fresh copy, so callers may add tokens without touching the cached one.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()),
        eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_tiny_config(family, len(tokenizer)), dtype=torch.float32)
    return model, tokenizer


for _family in ("llama", "qwen2", "mistral", "phi3", "gpt2", "opt"):
    LLMS.register(f"tiny-{_family}")(functools.partial(lambda arg, options, family: build_tiny(family), family=_family))
