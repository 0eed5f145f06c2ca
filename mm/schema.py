"""Typed config loading: plain nested dataclasses are the schema; every value is checked against its annotation.

Written once here instead of taking pydantic or msgspec: the schema stays plain dataclasses (what the parts
already declare), the checks need only ``typing`` introspection, and every error is exactly one line naming the
dotted key, the expected type and the value (``config key data.batch_size: expected int, got 'two'``).

Supported annotations: ``int``, ``float`` (also YAML 1.1's ``1e-3``, which it reads as a string), ``bool``,
``str``, ``Any``, ``list[X]``, ``dict[str, X]``, ``Literal[...]``, ``X | None`` and other unions, nested
dataclasses, and :class:`Part` fields (a registered part's name plus its own options dataclass).
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from mm.errors import MMError

C = TypeVar("C")
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


@dataclass
class Part:
    """A registered part: ``name`` is its spec (``pool``, ``timm:resnet18``, ``hf:/models/clip``) and
    ``options`` an instance of the options dataclass the part registered. Written in YAML as the bare spec or
    as a mapping ``{name: <spec>, <option>: <value>, ...}``."""

    name: str
    options: Any = None


def part_field(kind: str, default: str | None):
    """A dataclass field holding a :class:`Part` of ``kind`` (``encoder``, ``adapter``, ``llm``, ``loss``,
    ``router``); ``default`` is the spec used when the config names none."""
    factory = (lambda: default) if default is not None else (lambda: None)
    return dataclasses.field(default_factory=factory, metadata={"part": kind})


def type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_])", "", str(tp))  # typing.X, mm.train.config.X -> X


def _fail(key: str, tp: Any, value: Any) -> MMError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return MMError(f"config key {key}: expected {type_name(tp)}, got {shown}")


def _same_shape(value: Any, tp: Any) -> bool:
    """Whether ``value`` is a mapping meant for a dataclass / dict, or a list meant for a list annotation."""
    origin = typing.get_origin(tp)
    if isinstance(value, dict):
        return dataclasses.is_dataclass(tp) or origin is dict
    if isinstance(value, (list, tuple)):
        return origin in (list, tuple)
    return False


def check(value: Any, tp: Any, key: str) -> Any:
    """``value`` converted to annotation ``tp`` where that is lossless, else MMError naming ``key``."""
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or isinstance(tp, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = None
        for arg in (a for a in args if a is not type(None)):
            try:
                return check(value, arg, key)
            except MMError as exc:
                if _same_shape(value, arg):
                    inner = exc  # the member the value was meant for explains best what is wrong
        raise inner or _fail(key, tp, value)
    if origin is Literal:
        if value in args:
            return value
        raise MMError(f"config key {key}: expected one of {', '.join(map(repr, args))}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _fail(key, tp, value)
        return [check(item, args[0] if args else Any, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(key, tp, value)
        return {check(k, args[0], key): check(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return from_dict(tp, value, f"{key}.")
        raise _fail(key, tp, value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _fail(key, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.match(value.strip()):
            return float(value)
        raise _fail(key, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _fail(key, tp, value)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _fail(key, tp, value)
    return value


def check_part(value: Any, kind: str, key: str) -> Part | None:
    """A :class:`Part` of ``kind`` from a spec string, a mapping ``{name, **options}`` or a Part."""
    from mm.parts import registry

    if value is None:
        return None
    if isinstance(value, Part):
        name, options = value.name, value.options
    elif isinstance(value, str):
        name, options = value, None
    elif isinstance(value, dict):
        if "name" not in value:
            raise MMError(f"config key {key}: a {kind} section needs a name (e.g. {key}.name=...)")
        name = check(value["name"], str, f"{key}.name")
        options = {k: v for k, v in value.items() if k != "name"}
    else:
        raise MMError(f"config key {key}: expected a {kind} name or a mapping with a name, got {value!r}")
    try:
        cls = registry(kind).entry(name).options
    except MMError as exc:
        raise MMError(f"config key {key}: {exc}") from None
    if options is None:
        options = cls()
    elif isinstance(options, dict):
        options = from_dict(cls, options, f"{key}.")
    elif not isinstance(options, cls):
        raise MMError(f"config key {key}: options of {kind} {name!r} must be {cls.__name__}, "
                      f"got {type(options).__name__}")
    return Part(name, options)


def from_dict(cls: type[C], data: dict[str, Any] | None, where: str = "") -> C:
    """Build dataclass ``cls`` from a plain dict, checking every value against its annotation."""
    data = data or {}
    if not isinstance(data, dict):
        raise MMError(f"config {where.rstrip('.') or cls.__name__}: expected a mapping, got {data!r}")
    migrate = getattr(cls, "migrate", None)
    if migrate is not None:
        data = migrate(dict(data))
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            valid = f"valid keys: {', '.join(fields)}" if fields else "this section takes no options"
            raise MMError(f"unknown config key {where + str(key)!r}; {valid}")
        kind = fields[key].metadata.get("part")
        if kind is not None:
            default = fields[key].default_factory()
            if isinstance(value, dict) and "name" not in value and isinstance(default, str):
                value = {"name": default, **value}  # options for the default part
            kwargs[key] = check_part(value, kind, where + key)
        else:
            kwargs[key] = check(value, hints[key], where + key)
    return cls(**kwargs)


def to_dict(config: Any) -> Any:
    """Plain data (YAML/JSON-ready): dataclasses as mappings, parts as ``{name, **options}``."""
    if isinstance(config, Part):
        return {"name": config.name, **to_dict(config.options)}
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(item) for item in config]
    if isinstance(config, dict):
        return {key: to_dict(value) for key, value in config.items()}
    return config


def normalise_parts(config: Any) -> None:
    """Turn the spec strings / mappings a caller put into ``config``'s part fields into checked Parts (for
    configs built in Python, e.g. ``ModelConfig(adapter="pool")``); called from ``__post_init__``."""
    for f in dataclasses.fields(config):
        kind = f.metadata.get("part")
        value = getattr(config, f.name)
        if kind is not None and not (isinstance(value, Part) and value.options is not None):
            setattr(config, f.name, check_part(value, kind, f.name))
