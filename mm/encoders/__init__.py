"""Vision encoders; importing this registers every family (open_clip and transformers load lazily)."""
from mm.encoders import hf_encoder, open_clip_encoder, timm_encoder, tiny_vit  # noqa: F401  (registration)
from mm.encoders import patch  # noqa: F401  (registration: monolithic patch embedding, mm/moe)
from mm.encoders.base import ENCODERS, VisionEncoder

__all__ = ["ENCODERS", "VisionEncoder"]
