"""Where each kind of part is registered. Importing a kind's package registers its built-in parts; installed
packages may add parts through the ``mm.parts`` entry-point group (each entry point names a module whose import
registers them), loaded once on first use."""
from __future__ import annotations

from importlib import import_module, metadata

from mm.registry import Registry

KINDS = ("encoder", "adapter", "llm", "loss", "router", "layout")
_plugins_loaded = False


def load_plugins() -> None:
    """Import every module named in the ``mm.parts`` entry-point group of the installed distributions."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry_point in metadata.entry_points(group="mm.parts"):
        import_module(entry_point.module)


def registry(kind: str) -> Registry:
    """The registry of ``kind`` (one of KINDS), with its built-in parts and any plugins registered."""
    load_plugins()
    if kind == "encoder":
        from mm.encoders import ENCODERS

        return ENCODERS
    if kind == "adapter":
        from mm.adapters import ADAPTERS

        return ADAPTERS
    if kind == "llm":
        from mm.llm import LLMS

        return LLMS
    if kind == "loss":
        from mm.train.losses import LOSSES

        return LOSSES
    if kind == "router":
        from mm.moe.routers import ROUTERS

        return ROUTERS
    if kind == "layout":
        from mm.layouts import LAYOUTS

        return LAYOUTS
    raise ValueError(f"unknown part kind {kind!r}; kinds: {', '.join(KINDS)}")
