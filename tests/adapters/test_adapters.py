"""Adapter contracts: [B, prefix + rows*cols, Din] -> [B, num_tokens, Dllm], prefix dropped, pooling geometry."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mm.adapters import ADAPTERS, Adapter
from mm.adapters.pixel_shuffle import pixel_shuffle
from mm.encoders.base import VisionEncoder
from mm.errors import MMError

DIN, DLLM = 12, 20


class FakeEncoder(VisionEncoder):
    """Only the bookkeeping adapters read: dim, grid, prefix count."""

    def __init__(self, grid: tuple[int, int], num_prefix_tokens: int = 1, dim: int = DIN):
        super().__init__()
        self.grid, self.num_prefix_tokens, self.dim = grid, num_prefix_tokens, dim


def build(name: str, encoder: VisionEncoder, **options) -> Adapter:
    """The adapter ``name`` with the given options (options it does not declare are left out)."""
    entry = ADAPTERS.entry(name)
    declared = {k: v for k, v in options.items() if k in entry.options.__dataclass_fields__}
    return entry.builder(encoder, DLLM, entry.options(**declared))


def tokens_for(encoder: VisionEncoder, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, encoder.num_tokens, encoder.dim)  # [B, prefix + rows*cols, Din]


EXPECTED = {  # grid (4, 6) with pool size 3 and 5 resampler queries (every adapter: test_contracts.py)
    "linear": 24, "mlp": 24, "pool": 9, "pixel-shuffle": 6, "resampler": 5,
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shape_and_prefix_dropped(name):
    encoder = FakeEncoder((4, 6), num_prefix_tokens=2)
    adapter = build(name, encoder, size=3, queries=5).eval()
    assert adapter.num_tokens == EXPECTED[name]
    tokens = tokens_for(encoder)
    out = adapter(tokens)
    assert out.shape == (2, EXPECTED[name], DLLM)
    changed = tokens.clone()
    changed[:, :2] = torch.randn(2, 2, DIN) * 100  # prefix tokens must not matter
    torch.testing.assert_close(adapter(changed), out)


def test_unknown_adapter_lists_choices():
    with pytest.raises(MMError, match="choose one of: " + ", ".join(ADAPTERS.names())):
        ADAPTERS.get("qformer")


def test_mlp_hidden_width():
    adapter = build("mlp", FakeEncoder((2, 2)), hidden=7)
    assert adapter.mlp[0].out_features == 7 and adapter.mlp[2].out_features == DLLM


@pytest.mark.parametrize("grid, pool_size", [((7, 7), 1), ((7, 7), 3), ((7, 7), 7), ((4, 6), 3), ((5, 5), 2),
                                             ((16, 16), 4)])
def test_pool_gives_exactly_p_squared(grid, pool_size):
    encoder = FakeEncoder(grid)
    adapter = build("pool", encoder, size=pool_size)
    assert adapter.num_tokens == pool_size**2
    assert adapter(tokens_for(encoder)).shape == (2, pool_size**2, DLLM)


def test_pool_averages_blocks_in_raster_order():
    encoder = FakeEncoder((4, 4), num_prefix_tokens=1)
    adapter = build("pool", encoder, size=2)
    adapter.norm, adapter.mlp = nn.Identity(), nn.Identity()  # expose the pooling itself
    tokens = tokens_for(encoder, batch=1)
    grid = tokens[0, 1:].reshape(4, 4, DIN)
    expected = torch.stack([grid[r:r + 2, c:c + 2].mean(dim=(0, 1)) for r in (0, 2) for c in (0, 2)])
    torch.testing.assert_close(adapter(tokens)[0], expected)


def test_pool_size_larger_than_grid_is_an_error():
    with pytest.raises(MMError, match="pool adapter size 5"):
        build("pool", FakeEncoder((4, 4)), size=5)


@pytest.mark.parametrize("grid, expected", [((4, 4), 4), ((6, 4), 6), ((7, 7), 16), ((5, 3), 6)])
def test_pixel_shuffle_halves_the_grid(grid, expected):
    encoder = FakeEncoder(grid)
    adapter = build("pixel-shuffle", encoder)
    assert adapter.num_tokens == expected
    assert adapter(tokens_for(encoder)).shape == (2, expected, DLLM)


def internvl_pixel_shuffle(x: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
    """InternVL's reference code (ps_version 'v2'), for [N, rows, cols, C]."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    return x.permute(0, 2, 1, 3).contiguous()


def test_pixel_shuffle_matches_internvl_layout():
    x = torch.randn(2, 6, 4, 3)  # [B, rows, cols, C]
    ours = pixel_shuffle(x)  # [B, 3*2, 12]
    torch.testing.assert_close(ours, internvl_pixel_shuffle(x).reshape(2, 6, 12))
    torch.testing.assert_close(ours[0, 1], torch.cat([x[0, 0, 2], x[0, 0, 3], x[0, 1, 2], x[0, 1, 3]]))


@pytest.mark.parametrize("grid, queries", [((4, 4), 3), ((7, 5), 8), ((2, 2), 16)])
def test_resampler_outputs_one_token_per_query(grid, queries):
    encoder = FakeEncoder(grid)
    adapter = build("resampler", encoder, queries=queries)
    assert adapter.num_tokens == queries
    assert adapter(tokens_for(encoder)).shape == (2, queries, DLLM)
