"""The recipes with tiling layouts. Large ones (Mono-InternVL-style ``dynamic``, LLaVA-NeXT-style ``anyres``) build
on the meta device (no weights) with their layouts, and every image they can meet fits their budgets and rows;
lite/1_align_dynamic feeds tiled rows within its budgets; tiny/1_align_dynamic trains two real steps."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from PIL import Image

import mm
from mm.commands.train import resolve_recipe
from mm.config import load_config
from mm.train import TrainConfig, validate
from mm.train.build import build_student

from train_helpers import ROOT, run, states_equal, tiny_config

TILED = sorted(p for p in (ROOT / "recipes").glob("*/*.yaml") if "dynamic" in p.stem or "anyres" in p.stem)
LARGE = [p for p in TILED if p.parent.name == "large"]
SHAPES = [(1000, 300), (300, 1000), (1000, 1000), (4000, 4000), (640, 480), (8000, 500), (500, 8000), (40, 40)]


def recipe(path: Path) -> TrainConfig:
    """The recipe validated, with the model of the first stage of its chain (init_from keeps that model)."""
    config = validate(load_config(TrainConfig, [path]))
    root = config
    while root.init_from:
        stages = [load_config(TrainConfig, [p]) for p in path.parent.glob("*.yaml")]
        root = next(p for p in stages if p.output_dir == root.init_from)
    layout = config.model.layout  # a stage's own non-default layout replaces init_from's (continue_from)
    config.model = root.model
    if layout.name != "fixed":
        config.model.layout = layout
    return config


def test_the_tiled_recipes_ship_and_resolve_by_name():
    names = {f"{p.parent.name}/{p.stem}" for p in TILED}
    assert {"tiny/1_align_dynamic", "lite/1_align_dynamic", "lite/3_instruct_dynamic", "large/evip_s1_1_dynamic",
            "large/evip_s1_3_dynamic", "large/1_align_anyres", "large/3_instruct_anyres"} <= names
    for name in names:
        assert resolve_recipe(name) == ROOT / "recipes" / f"{name}.yaml"
        assert recipe(resolve_recipe(name)).model.layout.name in ("dynamic", "anyres")


@pytest.mark.parametrize("path", LARGE, ids=lambda p: p.stem)
def test_large_tiled_recipe_on_meta(path: Path):
    from large_parts import meta_model

    config = recipe(path)
    model = meta_model(config.model)
    layout = config.model.layout
    tile, per_tile = model.encoder.image_size, model.tokens_per_image
    assert (layout.name, tile, per_tile) in {("dynamic", 448, 256), ("anyres", 336, 576)}
    assert next(model.parameters()).is_meta and sum(p.numel() for p in model.parameters()) > 1e9
    budget = layout.options.max_image_tokens
    row = config.data.max_row_image_tokens
    for size in SHAPES:
        tokens = len(model.image_spans([Image.new("RGB", size)])[0])
        assert tokens <= min(b for b in (budget, row, config.data.seq_len - 256) if b is not None), (size, tokens)
    if layout.name == "dynamic":  # docs/images.md's example
        assert len(model.image_spans([Image.new("RGB", (1000, 300))])[0]) == 4 * 256 + 1
        assert config.model.moe is not None and config.model.moe.ffn_experts
    if row is not None:  # a row takes at least one whole image of the largest kind
        assert row >= max(len(model.image_spans([Image.new("RGB", s)])[0]) for s in SHAPES)


def test_lite_dynamic_recipe_feeds_tiled_rows_within_its_budgets(corpus):
    from mm.data import build_loader

    config = load_config(TrainConfig, [ROOT / "recipes/lite/1_align_dynamic.yaml"], [
        f"data.train={corpus}/train/interleaved-*.tar", "data.shuffle_buffer=8"])
    torch.manual_seed(0)
    model = mm.build(config.model)
    assert (model.encoder.image_size, model.tokens_per_image) == (64, 4)
    assert len(model.image_spans([Image.new("RGB", (96, 96))])[0]) == 5 * 4 + 2  # the recipe's arithmetic
    budget = config.data.max_row_image_tokens
    tiles = images = 0
    for batch in itertools.islice(build_loader(config.data, model, kind="interleaved"), 3):
        ids = batch["input_ids"]
        image_ids = (ids == model.image_token_id).sum(1)
        assert int(image_ids.sum()) == batch["pixel_values"].shape[0] * model.tokens_per_image
        assert int(image_ids.max()) <= budget
        tiles += batch["pixel_values"].shape[0]
        images += int(((ids == model.image_token_id) & (ids.roll(1, 1) != model.image_token_id)).sum())
    assert tiles > images  # tiled: more encoder tiles than image runs


def test_tiny_dynamic_recipe_trains_two_steps(corpus, tmp_path):
    config = tiny_config("1_align_dynamic", tmp_path / "run", corpus, "data.seq_len=256")
    assert config.data.max_row_image_tokens == 164 and config.model.layout.name == "dynamic"
    before = {k: v.clone() for k, v in build_student(config).state_dict().items()}
    final = run(config)
    model = mm.load(final)
    assert model.config.layout.name == "dynamic" and model.config.layout.options.max_image_tokens == 164
    changed = set(states_equal(before, model.state_dict()))
    assert changed and all(name.startswith("adapter.") for name in changed)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
