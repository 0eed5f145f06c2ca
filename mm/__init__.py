"""mm: compose, train and run multimodal LLMs from pretrained vision towers and transformers LLMs."""
from mm.build import build
from mm.checkpoint import load, save
from mm.config import ModelConfig, MoEConfig, load_config
from mm.errors import MMError
from mm.model import MultimodalModel

__all__ = ["build", "load", "save", "ModelConfig", "MoEConfig", "load_config", "MMError", "MultimodalModel"]
