"""One tiny name -> builder registry, shared by encoders, adapters and LLMs."""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

from mm.errors import MMError

T = TypeVar("T", bound=Callable)


class Registry(Generic[T]):
    """Maps a family name to a builder.

    A spec is ``family`` or ``family:argument`` (``timm:tf_efficientnet_lite0``); the part after the first
    colon is handed to the builder as its ``arg``. Unknown names raise an error that lists the choices.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._builders: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(builder: T) -> T:
            if name in self._builders:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._builders[name] = builder
            return builder

        return decorate

    def get(self, spec: str) -> tuple[T, str | None]:
        """Return ``(builder, arg)`` for ``spec``."""
        family, _, arg = spec.partition(":")
        if family not in self._builders:
            raise MMError(f"unknown {self.kind} {spec!r}; choose one of: {', '.join(self.names())}")
        return self._builders[family], (arg or None)

    def names(self) -> list[str]:
        return sorted(self._builders)
