"""The model's config and the loading of any config: defaults < YAML files (in order) < ``key=value`` overrides.

Each part (encoder, adapter, LLM, MoE router) owns its options dataclass; ``ModelConfig`` holds the part's name
plus that options section. Values are checked against their annotations by ``mm.schema``; unknown keys are
errors that name the key and the valid ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from mm.errors import MMError
from mm.schema import Part, from_dict, normalise_parts, part_field, to_dict

C = TypeVar("C")

# Flat keys of configs saved before parts owned their options: old key -> (part field, option name).
FLAT_KEYS = {
    "encoder_path": ("encoder", "weights"),
    "select_layer": ("encoder", "select_layer"),
    "image_size": ("encoder", "image_size"),
    "pool_size": ("adapter", "size"),
    "resampler_queries": ("adapter", "queries"),
    "adapter_hidden": ("adapter", "hidden"),
}
# Flat router keys of old MoE sections -> the topk router's options.
FLAT_ROUTER_KEYS = ("num_experts", "top_k", "aux_loss_coef")


def _move_flat_keys(data: dict[str, Any], moves: dict[str, tuple[str, str]], kinds: dict[str, str]) -> dict:
    """Move each old flat key into the options of the part that declares it; drop it where the named part
    takes no such option (old configs saved every key, used or not)."""
    from mm.parts import registry

    for old, (field_name, option) in moves.items():
        if old not in data:
            continue
        value = data.pop(old)
        part = data.get(field_name)
        if part is None or isinstance(part, Part):
            continue
        section = {"name": part} if isinstance(part, str) else dict(part)
        if not isinstance(section.get("name"), str) or section["name"].partition(":")[0] not in \
                registry(kinds[field_name]):
            continue  # an unknown part: the normal check reports it
        declared = registry(kinds[field_name]).entry(section["name"]).options.__dataclass_fields__
        if option in declared and option not in section:
            section[option] = value
        data[field_name] = section
    return data


@dataclass
class MoEConfig:
    """Modality experts inside the LLM (Mono-InternVL)."""

    ffn_experts: bool = True  # a visual FFN expert per chosen layer, copied from the LLM's FFN
    attn_experts: bool = False  # visual q/k/v/o projections per chosen layer (Mono-InternVL-1.5)
    layers: str | list[int] = "all"  # "all" or a list of decoder-layer indices
    # a registered router with its options: "modality" (static, by token type) or
    # {name: topk, num_experts: 4, top_k: 2, aux_loss_coef: 0.01} (learned, MoE-LLaVA style)
    router: Part = part_field("router", "modality")

    def __post_init__(self) -> None:
        normalise_parts(self)

    @staticmethod
    def migrate(data: dict[str, Any]) -> dict[str, Any]:
        """Old flat ``num_experts`` / ``top_k`` / ``aux_loss_coef`` -> the top-k router's options."""
        data.setdefault("router", "modality")
        return _move_flat_keys(data, {key: ("router", key) for key in FLAT_ROUTER_KEYS}, {"router": "router"})


@dataclass
class ModelConfig:
    """Everything needed to build a MultimodalModel; saved beside every checkpoint.

    ``encoder``, ``adapter`` and ``llm`` are parts: a registry spec (``timm:tf_efficientnet_lite0``,
    ``pool``, ``smollm2-135m``) or ``{name: <spec>, <option>: <value>}`` with the options that part declares.
    """

    encoder: Part = part_field("encoder", "tiny-vit")
    adapter: Part = part_field("adapter", "mlp")
    llm: Part = part_field("llm", "tiny-llama")
    # how an image becomes encoder tiles: "fixed" (one image, one tile), {name: dynamic, max_tiles: 12} (InternVL),
    # {name: anyres, grids: [[1, 2], ...]} (LLaVA-NeXT); see docs/images.md
    layout: Part = part_field("layout", "fixed")
    freeze_llm: bool = True
    freeze_encoder: bool = True
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    moe: MoEConfig | None = None

    def __post_init__(self) -> None:
        normalise_parts(self)

    @staticmethod
    def migrate(data: dict[str, Any]) -> dict[str, Any]:
        """Old flat keys (``pool_size``, ``select_layer``, ...) -> the options of the part that declares them."""
        return _move_flat_keys(data, FLAT_KEYS, {"encoder": "encoder", "adapter": "adapter"})


def _parse_value(text: str) -> Any:
    """``key=value`` values are YAML scalars or flow collections: 3, 1e-4, true, null, [a, b]."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one dotted ``a.b.c=value`` override to a nested dict in place. A part given by its bare name
    (``adapter: pool``) becomes ``{name: pool}`` when an override reaches into it (``adapter.size=3``)."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise MMError(f"override {assignment!r} is not of the form key=value")
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if isinstance(child, str):
            child = node[part] = {"name": child}
        if not isinstance(child, dict):
            raise MMError(f"override {assignment!r}: {part!r} is not a section")
        node = child
    node[leaf] = _parse_value(text)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins. A part's bare name merged with a section keeps both."""
    out = dict(base)
    for key, value in update.items():
        old = out.get(key)
        if isinstance(value, dict) and isinstance(old, str) and "name" not in value:
            old = {"name": old}
        if isinstance(value, dict) and isinstance(old, dict):
            out[key] = merge(old, value)
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
    """Defaults < each YAML file in order < ``key=value`` overrides, checked against ``cls``."""
    data: dict[str, Any] = {}
    for path in files:
        data = merge(data, read_yaml(path))
    for assignment in overrides:
        apply_override(data, assignment)
    return from_dict(cls, data)


__all__ = ["ModelConfig", "MoEConfig", "Part", "load_config", "from_dict", "to_dict", "merge", "read_yaml",
           "apply_override"]
