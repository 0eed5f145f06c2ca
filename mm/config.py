"""Typed configs: nested dataclasses are the only schema.

Precedence: dataclass defaults < YAML files (in order) < ``key=value`` overrides. Unknown keys are errors
that name the key and the valid ones.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mm.errors import MMError

C = TypeVar("C")


@dataclass
class MoEConfig:
    """Modality experts inside the LLM (Mono-InternVL)."""

    ffn_experts: bool = True  # a visual FFN expert per chosen layer, copied from the LLM's FFN
    attn_experts: bool = False  # visual q/k/v/o projections per chosen layer (Mono-InternVL-1.5)
    layers: Any = "all"  # "all" or a list of decoder-layer indices
    router: str = "modality"  # "modality" (static, by token type) or "topk" (learned, MoE-LLaVA style)
    num_experts: int = 4  # topk router only: experts per layer, each upcycled from the FFN
    top_k: int = 2  # topk router only
    aux_loss_coef: float = 0.01  # topk router only: load-balancing loss weight


@dataclass
class ModelConfig:
    """Everything needed to build a MultimodalModel; saved beside every checkpoint."""

    encoder: str = "tiny-vit"  # registry spec, e.g. "timm:tf_efficientnet_lite0", "open_clip:ViT-B-32", "hf:/path"
    adapter: str = "mlp"  # linear | mlp | pool | pixel-shuffle | resampler
    llm: str = "tiny-llama"  # registry spec, e.g. "smollm2-135m", "hf:/path/to/causal-lm"
    encoder_path: str | None = None  # local weights for the encoder (open_clip checkpoint file, ...)
    select_layer: int = -1  # transformers towers: which hidden state to take (-2 = LLaVA's penultimate)
    image_size: int | None = None  # override the encoder's default input size
    pool_size: int = 7  # pool adapter: P, giving P*P tokens per image
    resampler_queries: int = 64  # resampler adapter: learned queries = tokens per image
    adapter_hidden: int | None = None  # hidden width of MLP-style adapters (default: the LLM width)
    freeze_llm: bool = True
    freeze_encoder: bool = True
    dtype: str = "float32"  # float32 | bfloat16 | float16
    moe: MoEConfig | None = None


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass inside ``tp`` (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def from_dict(cls: type[C], data: dict[str, Any] | None, where: str = "") -> C:
    """Build dataclass ``cls`` from a plain dict, recursing into nested dataclasses."""
    data = data or {}
    if not isinstance(data, dict):
        raise MMError(f"config {where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise MMError(f"unknown config key {where + key!r}; valid keys: {', '.join(names)}")
        nested = _dataclass_in(hints[key])
        if nested is not None and isinstance(value, dict):
            value = from_dict(nested, value, f"{where}{key}.")
        kwargs[key] = value
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _parse_value(text: str) -> Any:
    """``key=value`` values are YAML scalars or flow collections: 3, 1e-4, true, null, [a, b]."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one dotted ``a.b.c=value`` override to a nested dict in place."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise MMError(f"override {assignment!r} is not of the form key=value")
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise MMError(f"override {assignment!r}: {part!r} is not a section")
        node = child
    node[leaf] = _parse_value(text)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MMError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise MMError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise MMError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(cls: type[C], files: list[str | Path] = (), overrides: list[str] = ()) -> C:
    """Defaults < each YAML file in order < ``key=value`` overrides, validated against ``cls``."""
    data: dict[str, Any] = {}
    for path in files:
        data = merge(data, read_yaml(path))
    for assignment in overrides:
        apply_override(data, assignment)
    return from_dict(cls, data)
