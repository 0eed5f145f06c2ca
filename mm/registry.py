"""One tiny registry of parts, shared by encoders, adapters, LLMs, losses and MoE routers.

A part is registered under a family name with its builder, its own typed options dataclass and the
capabilities it declares (``"llava"``: exportable to a transformers LLaVA checkpoint, ...). Callers ask the
entry what a part supports; nothing outside a part's file branches on its name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from mm.errors import MMError


@dataclass(frozen=True)
class NoOptions:
    """The options of a part that takes none."""


@dataclass(frozen=True)
class Entry:
    """A registered part: ``builder``, its ``options`` dataclass, declared ``capabilities`` and ``extras``
    (per-kind hooks, e.g. an LLM family's ``rebuild`` from saved files).

    Every part also gives ``example(workdir) -> config section | None``: a small instance that builds offline
    (writing any files it needs under ``workdir``), which the registry-driven contract tests build, save, load
    and train; None when it cannot be built here (e.g. its weights package is not installed)."""

    name: str
    builder: Callable
    options: type = NoOptions
    capabilities: frozenset[str] = frozenset()
    extras: dict[str, Any] = field(default_factory=dict)

    def supports(self, capability: str) -> bool:
        return capability in self.capabilities

    def example(self, workdir) -> dict | None:
        make = self.extras.get("example")
        return make(workdir) if make is not None else {"name": self.name}


class Registry:
    """Maps a family name to an :class:`Entry`.

    A spec is ``family`` or ``family:argument`` (``timm:tf_efficientnet_lite0``); the part after the first
    colon is the builder's ``arg``. Unknown names raise an error that lists the choices.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, options: type = NoOptions, capabilities: tuple[str, ...] = (),
                 **extras: Any) -> Callable[[Callable], Callable]:
        def decorate(builder: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, builder, options, frozenset(capabilities), dict(extras))
            return builder

        return decorate

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register a part of their own clean up with this)."""
        self._entries.pop(name, None)

    def entry(self, spec: str) -> Entry:
        family = split_spec(spec)[0]
        if family not in self._entries:
            raise MMError(f"unknown {self.kind} {spec!r}; choose one of: {', '.join(self.names())}")
        return self._entries[family]

    def get(self, spec: str) -> tuple[Callable, str | None]:
        """Return ``(builder, arg)`` for ``spec``."""
        return self.entry(spec).builder, split_spec(spec)[1]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, spec: str) -> bool:
        return split_spec(spec)[0] in self._entries


def split_spec(spec: str) -> tuple[str, str | None]:
    """``"family:arg"`` -> ``("family", "arg")``; ``"family"`` -> ``("family", None)``."""
    family, _, arg = spec.partition(":")
    return family, (arg or None)
