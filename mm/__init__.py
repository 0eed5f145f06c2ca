"""mm: compose, train and run multimodal LLMs from pretrained vision towers and transformers LLMs.

The public names are imported on first use (``import mm`` stays light, so ``mm --help`` needs no torch).
"""
from importlib import import_module, metadata

# public name -> the module that defines it; edit here when a module moves or is renamed
EXPORTS = {
    "build": "mm.compose",
    "load": "mm.loading",
    "save": "mm.checkpoint",
    "ModelConfig": "mm.config",
    "MoEConfig": "mm.config",
    "load_config": "mm.config",
    "MMError": "mm.errors",
    "MultimodalModel": "mm.model",
}
__all__ = [*EXPORTS, "__version__"]

try:
    __version__ = metadata.version("mm-vlm")  # the distribution name (mm.cli.DISTRIBUTION)
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"


def __getattr__(name: str):
    if name not in EXPORTS:
        raise AttributeError(f"module 'mm' has no attribute {name!r}")
    value = getattr(import_module(EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *EXPORTS})
