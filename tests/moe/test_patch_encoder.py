"""The monolithic ``patch`` encoder: Conv2d patch embedding + interpolatable position embedding, no CLS."""
from __future__ import annotations

import pytest
import torch

import mm
from mm.compose import build_encoder
from mm.encoders.patch import PatchEncoder
from mm.errors import MMError
from tests.moe.conftest import build, image


def test_grid_tokens_and_transform():
    encoder = build_encoder(mm.ModelConfig(encoder={"name": "patch:32", "image_size": 56}), pretrained=True)
    assert isinstance(encoder, PatchEncoder)
    assert (encoder.grid, encoder.dim, encoder.num_prefix_tokens, encoder.num_tokens) == ((4, 4), 32, 0, 16)
    pixels = encoder.transform(image(0, size=90))
    assert pixels.shape == (3, 56, 56)
    tokens = encoder(pixels[None])
    assert tokens.shape == (1, 16, 32)
    # each token sees only its own 14 x 14 patch: changing one patch changes one token
    changed = pixels.clone()
    changed[:, 14:28, 28:42] += 1
    diff = (encoder(changed[None]) != tokens).any(-1)[0]
    assert diff.nonzero().flatten().tolist() == [1 * 4 + 2]


def test_default_is_448_px_to_256_tokens_after_pixel_shuffle():
    torch.manual_seed(0)
    model = mm.build(mm.ModelConfig(encoder="patch:8", adapter="pixel-shuffle", llm="tiny-llama"))
    assert model.encoder.grid == (32, 32) and model.tokens_per_image == 256


def test_position_embedding_is_interpolated_for_other_sizes():
    encoder = PatchEncoder(width=16, image_size=56)
    table = encoder.position_embedding(4, 4)
    assert table is encoder.pos_embed
    larger = encoder.position_embedding(6, 6)
    assert larger.shape == (1, 36, 16)
    assert encoder(torch.zeros(2, 3, 84, 84)).shape == (2, 36, 16)
    # interpolating to the same grid through the bicubic path is the identity (align_corners=False)
    same = torch.nn.functional.interpolate(encoder.pos_embed.reshape(1, 4, 4, 16).permute(0, 3, 1, 2),
                                           size=(4, 4), mode="bicubic", align_corners=False)
    torch.testing.assert_close(same.flatten(2).transpose(1, 2), table)


def test_bad_specs_are_clear_errors():
    with pytest.raises(MMError, match="multiple of the patch size"):
        build_encoder(mm.ModelConfig(encoder={"name": "patch", "image_size": 50}), pretrained=True)
    with pytest.raises(MMError, match="integer width"):
        build_encoder(mm.ModelConfig(encoder={"name": "patch:wide", "image_size": 56}), pretrained=True)


def test_patch_pixel_shuffle_model_generates():
    model = build(moe=mm.MoEConfig())
    assert model.tokens_per_image == 4
    assert isinstance(model.generate(images=[image(5)], prompt="describe", max_new_tokens=3), str)
