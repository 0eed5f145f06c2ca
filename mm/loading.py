"""``mm.load``: rebuild a saved model from its directory alone, through the registries of its parts."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer

from mm.checkpoint import read_config, read_weights
from mm.compose import assemble, build_encoder, torch_dtype
from mm.errors import MMError
from mm.model import MultimodalModel
from mm.parts import registry


def load(directory: str | Path, device: str | torch.device | None = None, dtype: str | None = None
         ) -> MultimodalModel:
    """Skeleton from the saved configs (the encoder from its saved files, the LLM through its family's
    ``rebuild``), then the weights, strictly. ``dtype`` overrides the saved one."""
    directory = Path(directory)
    config = read_config(directory)
    if dtype is not None:
        torch_dtype(dtype)
        config.dtype = dtype
    for part in ("llm/config.json", "tokenizer"):
        if not (directory / part).exists():
            raise MMError(f"{directory} is incomplete: {part} is missing")
    state = read_weights(directory)
    saved_encoder = directory / "encoder"
    encoder = build_encoder(config, pretrained=False, saved=saved_encoder if saved_encoder.is_dir() else None)
    llm = registry("llm").rebuild(config.llm.name, directory / "llm")
    tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer", trust_remote_code=False)
    model = assemble(config, encoder, llm, tokenizer)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise MMError(
            f"weights in {directory} do not fit its config: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    model.load_state_dict(state, strict=True)
    if device is not None:
        model.to(device)
    return model.to(torch_dtype(config.dtype)).eval()


def resolve_model_dir(path: str | Path) -> Path:
    """A run dir (its ``final`` export) or an mm model dir -> the mm model dir."""
    path = Path(path)
    if (path / "mm_config.json").is_file():
        return path
    if (path / "final" / "mm_config.json").is_file():
        return path / "final"
    if not path.exists():
        raise MMError(f"model or run directory not found: {path}")
    raise MMError(f"{path} is neither an mm model dir nor a finished run (no mm_config.json, no final/)")
