"""Tiled images in training: the loader lays out each document's images with the model's layout, packs their
tile tokens (never cut through), and a dynamic-tiling model trains through the real loop."""
from __future__ import annotations

import itertools

import torch

import mm
from mm.config import load_config
from mm.train import TrainConfig

from train_helpers import TINY, run, tiny_config

DYNAMIC = ["model.layout.name=dynamic", "model.layout.max_tiles=4"]


def test_loader_feeds_every_tile_and_its_tokens(corpus):
    from mm.data import build_loader
    from mm.data.render import Renderer
    from mm.data.shards import iter_members, list_shards, parse_sample

    config = load_config(TrainConfig, [TINY / "1_align.yaml"], [
        f"data.train={corpus}/train/interleaved-*.tar", "data.batch_size=2", "data.seq_len=256",
        "data.shuffle_buffer=1", *DYNAMIC])
    torch.manual_seed(0)
    model = mm.build(config.model)
    # one document: its images become their layouts' tiles, and its markers their layouts' spans
    sample = next(iter_members(list_shards(config.data.train)[0]))
    key = sample["__key__"]
    doc, images = parse_sample(sample)
    item = Renderer.from_model(model, 256).item(key, doc, images, "interleaved")
    from mm.images import open_image

    decoded = [open_image(data) for data in images]
    tiled = model.layout_images(decoded)
    assert len(item.images) == sum(t.num_images for t in tiled) > len(decoded)  # wide synthetic images tile
    spans = model.image_spans(decoded)
    ids = item.rows[0].ids
    assert sum(len(span) for span in spans) == sum(1 for t in ids if t == model.image_token_id) + \
        sum(span.count(model.newline_id) for span in spans)
    for batch in itertools.islice(build_loader(config.data, model, kind="interleaved"), 3):
        image_tokens = int((batch["input_ids"] == model.image_token_id).sum())
        assert image_tokens == batch["pixel_values"].shape[0] * model.tokens_per_image  # every tile, no cut span


def test_a_dynamic_tiling_model_trains_and_reloads(corpus, tmp_path):
    config = tiny_config("1_align", tmp_path / "run", corpus, "data.seq_len=256", *DYNAMIC)
    final = run(config)
    model = mm.load(final)
    assert model.config.layout.name == "dynamic" and model.config.layout.options.max_tiles == 4


def test_a_stage_can_switch_init_froms_layout(corpus, tmp_path):
    """LLaVA-NeXT's schedule: align at one tile per image, then tune on AnyRes grids from that run."""
    align = run(tiny_config("1_align", tmp_path / "align", corpus, "data.seq_len=256"))
    assert mm.load(align).config.layout.name == "fixed"
    tuned = run(tiny_config("1_align", tmp_path / "anyres", corpus, f"init_from={align}", "data.seq_len=512",
                            "model.layout.name=anyres", "model.layout.arrangement=llava_next"))
    model = mm.load(tuned)
    assert model.config.layout.name == "anyres" and model.layout.rearranges_features
    kept = run(tiny_config("1_align", tmp_path / "kept", corpus, f"init_from={tuned}", "data.seq_len=512"))
    assert mm.load(kept).config.layout == model.config.layout  # the default model.layout keeps init_from's
