"""A model with a tiling layout: tiles through encoder and adapter, their tokens and separators in the text stream,
batched generation, save/load, budgets, the patch encoder with modality experts."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

import mm
from mm.errors import MMError
from mm.prompt import render_chat, user_message


def noise(width: int, height: int, seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def build(layout, seed: int = 0, **config) -> mm.MultimodalModel:
    torch.manual_seed(seed)
    return mm.build(mm.ModelConfig(encoder="tiny-vit", adapter="mlp", llm="tiny-llama", layout=layout, **config))


@pytest.fixture(scope="module")
def dynamic():
    return build({"name": "dynamic", "max_tiles": 4})  # tiny-vit: 32 px tiles, 16 tokens per tile


def conversations():
    wide = [{"role": "user", "content": [{"type": "text", "text": "what is"}, {"type": "image"},
                                          {"type": "text", "text": "and"}, {"type": "image"}]}]
    return [(wide, [noise(100, 30, 1), noise(30, 30, 2)]),
            ([user_message("a much longer question about the tall one", 1)], [noise(20, 60, 3)]),
            ([user_message("text only", 0)], [])]


def test_a_wide_image_takes_tiles_thumbnail_and_separators(dynamic):
    M, image_id, newline = dynamic.tokens_per_image, dynamic.image_token_id, dynamic.newline_id
    assert dynamic.tokenizer.decode([newline]) == "\n"
    messages = [user_message("hi", 1)]
    wide, square = noise(100, 30, 1), noise(30, 30, 2)
    ids, labels = dynamic.tokenize(messages, images=[wide])
    text, _ = render_chat(dynamic.tokenizer, messages, add_generation_prompt=True)
    start = text.index(image_id)
    # 100x30 at 32 px tiles, up to 4: 3x1 grid (3.33 is closest to 3/1), then the thumbnail
    assert ids[start:start + 4 * M + 1] == [image_id] * 3 * M + [newline] + [image_id] * M
    assert ids[:start] == text[:start] and ids[start + 4 * M + 1:] == text[start + 1:]
    assert all(label == -100 for label in labels[start:start + 4 * M + 1])
    assert dynamic.preprocess([wide]).shape == (4, 3, 32, 32)
    square_ids, _ = dynamic.tokenize(messages, images=[square])  # one tile: exactly the untiled stream
    assert square_ids == text[:start] + [image_id] * M + text[start + 1:]
    assert len(ids) > len(square_ids)


def test_tiles_land_in_their_placeholders_in_order(dynamic):
    batch = dynamic.collate(conversations())
    # wide 3x1 + thumbnail, square 1, tall 1x3 (1/3 exactly) + thumbnail
    assert batch["pixel_values"].shape[0] == 4 + 1 + 4
    is_image = batch["input_ids"] == dynamic.image_token_id
    assert int(is_image.sum()) == batch["pixel_values"].shape[0] * dynamic.tokens_per_image
    with torch.no_grad():
        embeddings = dynamic.embed(batch["input_ids"], batch["pixel_values"])
        features = dynamic.encode_images(batch["pixel_values"])  # [tiles, M, D]
    torch.testing.assert_close(embeddings[is_image], features.reshape(-1, features.shape[-1]), rtol=0, atol=0)


def test_tokenize_needs_the_images_when_tokens_depend_on_them(dynamic):
    with pytest.raises(MMError, match="layout 'dynamic' sizes each image's tokens by the image"):
        dynamic.tokenize([user_message("hi", 1)])


def test_batched_generation_equals_one_by_one(dynamic):
    batched = dynamic.generate_batch(conversations(), max_new_tokens=8)
    single = [dynamic.generate_batch([c], max_new_tokens=8)[0] for c in conversations()]
    assert batched == single
    kwargs = dict(images=[noise(100, 30, 1)], prompt="what?", max_new_tokens=6)
    assert dynamic.generate(use_cache=True, **kwargs) == dynamic.generate(use_cache=False, **kwargs)


def test_save_and_load_keep_the_layout(dynamic, tmp_path):
    dynamic.save(tmp_path / "m")
    loaded = mm.load(tmp_path / "m")
    assert loaded.config.layout == dynamic.config.layout
    first, again = dynamic.collate(conversations()), loaded.collate(conversations())
    assert all(torch.equal(first[key], again[key]) for key in first)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**first).logits, dynamic(**first).logits, rtol=0, atol=0)


def test_fixed_layout_is_todays_stream(images):
    model = build("fixed")
    messages = [user_message("two?", 2)]
    ids, _ = model.tokenize(messages)
    assert ids == model.tokenize(messages, images=images[:2])[0]
    text, _ = render_chat(model.tokenizer, messages, add_generation_prompt=True)
    assert len(ids) == len(text) + 2 * (model.tokens_per_image - 1)
    torch.testing.assert_close(model.preprocess(images[:2]),
                               torch.stack([model.encoder.transform(i) for i in images[:2]]), rtol=0, atol=0)


def test_document_budget_is_honoured_in_the_batch():
    budget = 70  # 16 tokens a tile: the wide image alone would take 4 tiles + a separator = 65
    model = build({"name": "dynamic", "max_tiles": 4, "max_image_tokens": budget})
    for messages, pictures in conversations()[:2]:
        ids, _ = model.tokenize(messages, images=pictures)
        text, _ = render_chat(model.tokenizer, messages, add_generation_prompt=True)
        image_tokens = len(ids) - (len(text) - text.count(model.image_token_id))
        assert image_tokens <= budget
        assert model.preprocess(pictures).shape[0] * model.tokens_per_image <= budget
    wide_and_square = conversations()[0][1]  # 65 + 16 tokens in full: over budget, so fewer tiles
    assert model.preprocess(wide_and_square).shape[0] < build({"name": "dynamic", "max_tiles": 4}).preprocess(
        wide_and_square).shape[0] == 5
    batch = model.collate(conversations())
    assert int((batch["input_ids"] == model.image_token_id).sum()) == \
        batch["pixel_values"].shape[0] * model.tokens_per_image


@pytest.mark.parametrize("layout", [{"name": "anyres", "grids": [[1, 2], [2, 1], [2, 2]]},
                                    {"name": "dynamic", "max_tiles": 3}])
def test_patch_encoder_with_modality_experts(layout):
    """Tile tokens are image tokens: they reach the visual experts, the separators do not."""
    torch.manual_seed(0)
    model = mm.build(mm.ModelConfig(encoder={"name": "patch:32", "image_size": 28}, adapter="pixel-shuffle",
                                    llm="tiny-llama", layout=layout, moe=mm.MoEConfig()))
    talks = conversations()
    batch = model.collate(talks)
    tiles = sum(len(t.images()) for _, pictures in talks for t in model.layout_images(pictures))
    assert batch["pixel_values"].shape[0] == tiles > 3
    assert int((batch["input_ids"] == model.image_token_id).sum()) == tiles * model.tokens_per_image
    batched = model.generate_batch(talks, max_new_tokens=5)
    assert batched == [model.generate_batch([c], max_new_tokens=5)[0] for c in talks]


def test_the_loaders_tiler_pickles_and_agrees_with_tokenize(dynamic):
    import pickle

    from mm.prompt import truncate_images

    tiler = pickle.loads(pickle.dumps(dynamic.image_tiler))
    messages, pictures = conversations()[0]
    ids, labels = render_chat(dynamic.tokenizer, messages, add_generation_prompt=True)
    tiled = tiler.lay_out(pictures)
    cut_ids, _, kept = truncate_images(ids, labels, tiler.image_token_id, tiler.spans(tiled), 10_000)
    assert (cut_ids, kept) == (dynamic.tokenize(messages, images=pictures)[0], 2)
    torch.testing.assert_close(torch.stack([dynamic.encoder.transform(t) for t in tiler.tiles(tiled)]),
                               dynamic.preprocess(pictures), rtol=0, atol=0)
