"""``mm.load``: rebuild a saved model from its directory alone, through the registries of its parts."""
from __future__ import annotations

from pathlib import Path

import torch

from mm.checkpoint import read_config, read_weights
from mm.compose import assemble, build_encoder, torch_dtype
from mm.config import ModelConfig
from mm.errors import MMError
from mm.llm.base import brief, load_tokenizer
from mm.model import MultimodalModel
from mm.parts import registry


def load(directory: str | Path, device: str | torch.device | None = None, dtype: str | None = None
         ) -> MultimodalModel:
    """Skeleton from the saved configs (the encoder from its saved files, the LLM through its family's
    ``rebuild``), then the weights, strictly. ``dtype`` overrides the saved one.

    A model directory may come from a stranger: no file in it runs code (``mm.llm.base.refuse_remote_code``), and
    the skeleton is first built on the meta device and checked against the weights' names and shapes, so a
    config that does not fit its weights (or asks for a terabyte) is one line before any memory is allocated."""
    directory = Path(directory)
    config = read_config(directory)
    if dtype is not None:
        torch_dtype(dtype)
        config.dtype = dtype
    for part in ("llm/config.json", "tokenizer"):
        if not (directory / part).exists():
            raise MMError(f"{directory} is incomplete: {part} is missing")
    state = read_weights(directory)
    tokenizer = load_tokenizer(directory / "tokenizer")
    try:
        meta_state = skeleton(config, directory, tokenizer, meta=True).state_dict()
    except Exception:  # noqa: BLE001  a part that cannot be built on meta: the real build below checks the same
        meta_state = None
    if meta_state is not None:
        check_fit(meta_state, state, directory)
    try:
        model = skeleton(config, directory, tokenizer)
    except MMError:
        raise
    except Exception as exc:  # a saved config that builds nothing sensible (negative sizes, wrong types)
        raise MMError(f"cannot rebuild the model in {directory} from its saved configs: {brief(exc)}") from None
    check_fit(model.state_dict(), state, directory)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shapes fit, values do not (a complex tensor for a float one)
        raise MMError(f"weights in {directory} do not fit its config: {brief(exc)}") from None
    if device is not None:
        model.to(device)
    return model.to(torch_dtype(config.dtype)).eval()


def skeleton(config: ModelConfig, directory: Path, tokenizer, meta: bool = False) -> MultimodalModel:
    """The architecture of the model saved in ``directory``, randomly initialised, from its saved configs alone: no
    weights are read. ``meta``: on the meta device (no memory; see ``encoder_skeleton``)."""
    saved = directory / "encoder" if (directory / "encoder").is_dir() else None
    if not meta:
        encoder = build_encoder(config, pretrained=False, saved=saved)
        return assemble(config, encoder, registry("llm").rebuild(config.llm.name, directory / "llm"), tokenizer)
    encoder = encoder_skeleton(config, saved)
    with torch.device("meta"):
        return assemble(config, encoder, registry("llm").rebuild(config.llm.name, directory / "llm"), tokenizer)


def encoder_skeleton(config: ModelConfig, saved: Path | None = None):
    """The encoder's architecture without its weights on the meta device; an encoder whose builder needs real
    tensors while it builds (open_clip copies its tables) is built on the CPU instead, still without weights."""
    try:
        with torch.device("meta"):
            return build_encoder(config, pretrained=False, saved=saved)
    except Exception:  # noqa: BLE001  a builder's own error shows again, as itself, off meta
        with torch.device("cpu"):
            return build_encoder(config, pretrained=False, saved=saved)


def check_fit(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], directory: Path) -> None:
    """MMError unless ``state`` has exactly the names and shapes of ``expected`` (a model's state dict)."""
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise MMError(
            f"weights in {directory} do not fit its config: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise MMError(f"weights in {directory} do not fit its config: {name} is {list(state[name].shape)} in "
                          f"the weights, {list(tensor.shape)} in the model its configs describe")


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
