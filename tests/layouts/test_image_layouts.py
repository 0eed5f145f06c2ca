"""The layouts' algorithms against tables worked out by hand from their published definitions
(InternVL's ``dynamic_preprocess``, LLaVA-NeXT's ``select_best_resolution``; ../shared/REFERENCE.md), never from
this code's output; plus thumbnails, tile counts, token counts and budgets."""
from __future__ import annotations

import pytest
from PIL import Image

from mm.config import ModelConfig, load_config
from mm.errors import MMError
from mm.layouts import LAYOUTS, TiledImage, lay_out
from mm.parts import registry
from mm.schema import from_dict, to_dict


def build(name: str, **options):
    entry = LAYOUTS.entry(name)
    return entry.builder(None, entry.options(**options) if options else entry.options())


def picture(width: int, height: int) -> Image.Image:
    """Four coloured quadrants, so a resize, a crop or a swapped tile changes pixels."""
    image = Image.new("RGB", (width, height), (250, 0, 0))
    image.paste((0, 250, 0), (width // 2, 0, width, height // 2))
    image.paste((0, 0, 250), (0, height // 2, width // 2, height))
    image.paste((250, 250, 0), (width // 2, height // 2, width, height))
    return image


# InternVL, tile 448, tiles 1..12 unless given. Candidates: every (cols, rows) with cols*rows in range, by count.
# "tie" rows: several grids share the closest ratio; a later grid wins iff the image area > 0.5*448^2*cols*rows
# (2x2: 401408, 4x2: 802816, 3x3: 903168, 6x2: 1204224).
INTERNVL = [
    # (width, height, options, expected (cols, rows))
    (448, 448, {}, (1, 1)),  # ratio 1: 1x1, 2x2, 3x3 tie; 200704 is not > 401408
    (800, 800, {}, (2, 2)),  # 640000 > 401408 (2x2) but not > 903168 (3x3)
    (1000, 1000, {}, (3, 3)),  # 1000000 > 903168
    (300, 300, {}, (1, 1)),
    (1000, 300, {}, (3, 1)),  # 3.33: 3/1 and 6/2 tie at 0.33 (7/2, 10/3 exceed 12 tiles); 300000 < 1204224
    (1500, 500, {}, (3, 1)),  # ratio 3 exactly, 750000 < 1204224
    (3000, 1000, {}, (6, 2)),  # ratio 3 exactly, 3000000 > 1204224
    (300, 1000, {}, (1, 3)),  # 0.3: 1/3 and 2/6 tie at 0.033; 300000 < 1204224
    (2000, 1000, {}, (4, 2)),  # ratio 2: 2/1 and 4/2 tie; 2000000 > 802816
    (1920, 1080, {}, (4, 2)),  # 1.78: 2/1 and 4/2 tie at 0.22 (3/2 is 0.28 off; 5/3 needs 15 tiles)
    (1920, 1080, {"max_tiles": 6}, (2, 1)),  # 4x2 no longer a candidate
    (100, 1000, {}, (1, 10)),  # 0.1 exactly
    (1250, 1000, {}, (4, 3)),  # 1.25: 4/3 is 0.083 off; 1/1, 2/2, 3/2 are 0.25 off; 5/4 needs 20 tiles
    (448, 448, {"min_tiles": 2}, (2, 2)),  # 1x1 is not a candidate; 3x3 loses the tie
]


@pytest.mark.parametrize("width, height, options, grid", INTERNVL)
def test_dynamic_grid_is_internvls(width, height, options, grid):
    tiled = build("dynamic", **options)(picture(width, height), 448)
    assert tiled.grid == grid
    assert len(tiled.tiles) == grid[0] * grid[1]
    assert all(tile.size == (448, 448) for tile in tiled.images())


def test_dynamic_tie_break_is_strictly_more_than_half_the_grid_area():
    # tile 12: a 2x2 grid is 576 px^2, half is 288. 17x17 = 289 > 288 -> 2x2; 16x16 = 256 -> 1x1.
    layout = build("dynamic")
    assert layout(picture(17, 17), 12).grid == (2, 2)
    assert layout(picture(16, 16), 12).grid == (1, 1)


# LLaVA-NeXT, tile 336, its default pinpoints 336x672, 672x336, 672x672, 1008x336, 336x1008 (w x h).
LLAVA_NEXT = [
    (1000, 300, (3, 1)),  # 1008x336: scale 1.008, 1008*302 capped at 300000 > 672x336's 672*201 = 135072
    (300, 300, (1, 2)),  # every grid: 90000 effective; 336x672 and 672x336 waste 135792 each, the earlier wins
    (800, 800, (2, 2)),  # 672x672: 451584 effective; the others 336*336 = 112896
    (400, 1200, (1, 3)),  # 336x1008: 336*1008 = 338688; 336x672: 224*672 = 150528
    (2000, 1000, (2, 1)),  # 672x336, 672x672, 1008x336 all 672*336 effective; 672x336 wastes nothing
]


@pytest.mark.parametrize("width, height, grid", LLAVA_NEXT)
def test_anyres_grid_is_llava_nexts(width, height, grid):
    image = picture(width, height)
    tiled = build("anyres")(image, 336)
    assert tiled.grid == grid and len(tiled.tiles) == grid[0] * grid[1]
    assert tiled.thumbnail_first and tiled.images()[0] is tiled.thumbnail  # the base image comes first


def test_anyres_pads_keeping_the_aspect_ratio():
    tiled = build("anyres", grids=[[2, 1]])(picture(40, 40), 10)  # 40x40 into 20x10: 10x10 centred, black sides
    assert tiled.grid == (2, 1)
    left, right = tiled.tiles
    assert left.getpixel((0, 5)) == (0, 0, 0) and right.getpixel((9, 5)) == (0, 0, 0)
    assert left.getpixel((6, 2)) == (250, 0, 0) and right.getpixel((3, 2)) == (0, 250, 0)


@pytest.mark.parametrize("name", ["dynamic", "anyres"])
def test_the_thumbnail_is_the_whole_image(name):
    image = picture(1000, 300)
    tiled = build(name)(image, 56)
    assert tiled.thumbnail is not None
    assert tiled.thumbnail.tobytes() == image.resize((56, 56)).tobytes()


def test_dynamic_tiles_are_the_resized_image_in_raster_order():
    image = picture(1000, 300)
    tiled = build("dynamic")(image, 50)
    cols, rows = tiled.grid
    whole = Image.new("RGB", (50 * cols, 50 * rows))
    for i, tile in enumerate(tiled.tiles):
        whole.paste(tile, ((i % cols) * 50, (i // cols) * 50))
    assert whole.tobytes() == image.resize((50 * cols, 50 * rows)).tobytes()
    assert tiled.images()[-1] is tiled.thumbnail  # InternVL's thumbnail comes last


def test_one_tile_gets_no_thumbnail_and_thumbnail_can_be_off():
    assert build("dynamic")(picture(300, 300), 448).thumbnail is None  # InternVL: only with several tiles
    assert build("dynamic", thumbnail=False)(picture(1000, 300), 448).num_images == 3


@pytest.mark.parametrize("name", ["dynamic", "anyres"])
def test_a_wide_image_gets_more_tiles_than_a_square_one(name):
    layout = build(name)
    wide, square = layout(picture(1000, 300), 336), layout(picture(300, 300), 336)
    assert wide.num_images > square.num_images


def test_token_count_is_tiles_times_tokens_plus_thumbnail_plus_separators():
    wide = build("dynamic")(picture(1000, 300), 448)  # 3x1 + thumbnail
    assert wide.token_ids(4, image_id=9, newline_id=1) == [9] * 12 + [1] + [9] * 4
    assert wide.num_tokens(4) == 3 * 4 + 4 + 1
    tall = build("dynamic")(picture(300, 1000), 448)  # 1x3 + thumbnail: a newline after each row
    assert tall.num_tokens(4) == 3 * 4 + 4 + 3
    square = build("anyres")(picture(800, 800), 336)  # base, newline, 2x2 with a newline after each row
    assert square.token_ids(2, image_id=9, newline_id=1) == [9, 9, 1] + ([9] * 4 + [1]) * 2
    assert square.num_tokens(2) == 4 * 2 + 2 + 1 + 2


def test_fixed_is_one_untouched_image_without_separators():
    image = picture(40, 30)
    tiled = build("fixed")(image, 32, budget_tiles=1)
    assert tiled.images() == [image] and tiled.token_ids(5, 9, 1) == [9] * 5
    assert LAYOUTS.entry("fixed").supports("llava") and not LAYOUTS.entry("dynamic").supports("llava")


@pytest.mark.parametrize("name", ["dynamic", "anyres"])
def test_tile_budget_is_honoured(name):
    layout = build(name)
    for size in [(1000, 300), (300, 1000), (1000, 1000), (3000, 1000), (300, 300)]:
        for budget in range(1, 14):
            assert layout(picture(*size), 64, budget).num_images <= budget, (size, budget)
    assert layout(picture(3000, 1000), 64, 1).num_images == 1


def test_document_token_budget_is_honoured_and_shared():
    layout = build("dynamic")
    # the table's 3000x1000, 1000x1000 and 300x1000 at tile 448, all scaled by 1/8 (same grids: 6x2, 3x3, 1x3)
    images = [picture(375, 125), picture(125, 125), picture(36, 120)]
    full = sum(t.num_tokens(4) for t in lay_out(layout, images, 56, 4))
    assert full == (12 * 4 + 2 + 4) + (9 * 4 + 3 + 4) + (3 * 4 + 3 + 4)  # tiles, newline per row, thumbnail
    assert [t.grid for t in lay_out(layout, images, 56, 4, full)] == [(6, 2), (3, 3), (1, 3)]
    for budget in range(12, full, 3):
        tiled = lay_out(layout, images, 56, 4, budget)
        assert sum(t.num_tokens(4) for t in tiled) <= budget, budget
    # 10 tokens short: the 6x2 image (54 tokens, the most) gives up tiles first; the others keep theirs
    assert [t.grid for t in lay_out(layout, images, 56, 4, full - 10)][1:] == [(3, 3), (1, 3)]
    assert [t.num_images for t in lay_out(layout, images, 56, 4, 12)] == [1, 1, 1]
    with pytest.raises(MMError, match="max_image_tokens 11 cannot hold 3 images of at least 4 tokens"):
        lay_out(layout, images, 56, 4, 11)


def test_grid_and_tile_count_must_agree():
    with pytest.raises(MMError, match="2x1 grid needs 2 tiles, got 1"):
        TiledImage([picture(4, 4)], (2, 1))


def test_config_field_defaults_to_fixed_and_round_trips(tmp_path):
    assert ModelConfig().layout.name == "fixed"
    old = from_dict(ModelConfig, {"encoder": "tiny-vit", "adapter": "mlp"})  # saved before layouts existed
    assert old.layout.name == "fixed"
    config = from_dict(ModelConfig, {"layout": {"name": "dynamic", "max_tiles": 6, "max_image_tokens": 500}})
    assert to_dict(config.layout) == {"name": "dynamic", "max_tiles": 6, "min_tiles": 1, "thumbnail": True,
                                      "max_image_tokens": 500}
    assert from_dict(ModelConfig, to_dict(config)).layout == config.layout
    recipe = tmp_path / "r.yaml"
    recipe.write_text("layout: anyres\n")
    loaded = load_config(ModelConfig, [recipe], ["layout.grids=[[1, 2], [2, 1]]"])
    assert loaded.layout.options.grids == [[1, 2], [2, 1]]
    with pytest.raises(MMError, match="unknown config key 'layout.tiles'"):
        from_dict(ModelConfig, {"layout": {"name": "dynamic", "tiles": 3}})
    with pytest.raises(MMError, match="unknown layout 'mosaic'; choose one of: anyres, dynamic, fixed"):
        from_dict(ModelConfig, {"layout": "mosaic"})


def test_bad_options_are_refused_when_built():
    with pytest.raises(MMError, match="min_tiles <= max_tiles"):
        build("dynamic", min_tiles=5, max_tiles=4)
    with pytest.raises(MMError, match="grids must be a non-empty list"):
        build("anyres", grids=[[0, 2]])


def test_every_registered_layout_builds_from_its_example(tmp_path):
    for name in registry("layout").names():
        section = registry("layout").entry(name).example(tmp_path)
        part = from_dict(ModelConfig, {"layout": section}).layout
        layout = registry("layout").entry(part.name).builder(None, part.options)
        assert layout(picture(90, 40), 16).num_images >= 1, name


def test_llava_export_refuses_tiling_layouts_in_one_line():
    from mm.interop.llava_export import config_problems

    fixed = config_problems(ModelConfig(encoder="tiny-vit", adapter="mlp"))
    assert not any("layout" in problem for problem in fixed)
    assert "layout 'dynamic' has no LLaVA or LlavaNext equivalent (exportable layouts: anyres -> LlavaNext, " \
        "fixed -> LLaVA)" in config_problems(ModelConfig(encoder="tiny-vit", adapter="mlp", layout="dynamic"))
