"""The files of a saved model: safetensors weights + the resolved config, nothing pickled (``mm.load``: mm/loading.py).

Directory layout (``save_pretrained``-style):
    mm_config.json                      the resolved ModelConfig
    model.safetensors                   all weights (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
    llm/config.json                     the LLM's transformers config (to rebuild its skeleton)
    tokenizer/                          the tokenizer, with ``<image>`` added
    encoder/                            optional: files the encoder needs to rebuild (transformers towers)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mm.config import ModelConfig, from_dict, to_dict
from mm.errors import MMError

CONFIG_FILE = "mm_config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop names that share storage with an earlier name (tied weights); return ``(unique, alias -> name)``."""
    seen: dict[tuple, str] = {}
    unique, aliases = {}, {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = tensor.detach().contiguous().cpu()
    return unique, aliases


def save(model, directory: str | Path, max_shard_size: str | int = "4GB") -> Path:
    """Write ``model`` to ``directory`` (created if needed); ``mm.load`` rebuilds it from there alone."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.llm.config.save_pretrained(directory / "llm")
    model.tokenizer.save_pretrained(directory / "tokenizer")
    model.encoder.save_files(directory / "encoder")
    state, aliases = _unique_tensors(model.state_dict())
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size, filename_pattern="model{suffix}.safetensors")
    metadata = {"format": "pt", "aliases": json.dumps(aliases)}
    for filename, names in split.filename_to_tensors.items():
        tmp = directory / (filename + ".tmp")
        save_file({name: state[name] for name in names}, str(tmp), metadata=metadata)
        os.replace(tmp, directory / filename)
    if split.is_sharded:
        _write_json(directory / INDEX_FILE, {"metadata": {"aliases": aliases}, "weight_map": split.tensor_to_filename})
    else:
        (directory / INDEX_FILE).unlink(missing_ok=True)
    _write_json(directory / CONFIG_FILE, to_dict(model.config))  # last: its presence marks a complete save
    return directory


def read_config(directory: str | Path) -> ModelConfig:
    directory = Path(directory)
    if not directory.is_dir():
        raise MMError(f"model directory not found: {directory}")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise MMError(f"{directory} is not an mm model directory: {CONFIG_FILE} is missing")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # not UTF-8, not JSON, nested past the recursion limit
        raise MMError(f"{path} is not valid JSON: {exc.__class__.__name__}: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise MMError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return from_dict(ModelConfig, data)


def _read_index(index: Path) -> tuple[list[str], dict[str, str]]:
    """Shard file names and aliases of a sharded save; every shard must be a plain file name in its directory."""
    try:
        data = json.loads(index.read_text())
        files = sorted(set(data["weight_map"].values()))
        aliases = data.get("metadata", {}).get("aliases", {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MMError(f"{index} is not a valid weight index: {exc.__class__.__name__}: {exc}") from None
    for name in files:
        if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
            raise MMError(f"{index} names a weight file outside its directory: {name!r}")
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise MMError(f"{index}: metadata.aliases must map names to names")
    return files, aliases


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a saved model, aliases restored. Refuses pickles."""
    index = directory / INDEX_FILE
    if index.is_file():
        files, aliases = _read_index(index)
    elif (directory / WEIGHTS_FILE).is_file():
        files, aliases = [WEIGHTS_FILE], None
    else:
        pickles = [p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise MMError(f"{directory} holds pickled weights ({', '.join(pickles)}); only safetensors are loaded")
        raise MMError(f"{directory} has no {WEIGHTS_FILE}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise MMError(f"{directory} is missing weight shard {name}")
        try:
            state.update(load_file(str(path)))
            if aliases is None:
                from safetensors import safe_open

                with safe_open(str(path), "pt") as handle:
                    aliases = json.loads((handle.metadata() or {}).get("aliases", "{}"))
        except (SafetensorError, OSError, ValueError, RecursionError) as exc:
            raise MMError(f"cannot read weights {path}: {exc}") from None
    return _restore_aliases(state, aliases or {}, directory)


def _restore_aliases(state: dict[str, torch.Tensor], aliases, directory: Path) -> dict[str, torch.Tensor]:
    """Add each tied name (alias -> name it shares storage with); the metadata comes from the file, so check it."""
    if not isinstance(aliases, dict):
        raise MMError(f"weights in {directory}: the aliases metadata must map names to names, "
                      f"not {type(aliases).__name__}")
    for alias, name in aliases.items():
        if not isinstance(alias, str) or not isinstance(name, str) or name not in state:
            raise MMError(f"weights in {directory}: alias {alias!r} names no tensor of the weights ({name!r})")
        state[alias] = state[name]
    return state
