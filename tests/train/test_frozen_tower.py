"""A frozen vision tower runs under ``no_grad`` (its output has no autograd graph; the adapter still learns) and
once per distinct image of a pass: a DPO pair's two sides share their images, so the policy and the reference each
encode them once, and the loss equals the one from encoding every side separately."""
from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

import mm
from mm.model import distinct_images
from mm.train.losses import DPOLoss
from mm.train.losses.dpo import dpo_loss, pair_logps
from mm.train.losses.forward import sequence_logps


def _image(seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (40, 40, 3), generator=generator, dtype=torch.uint8).numpy())


def _model(seed: int = 0, frozen_tower: bool = True) -> mm.MultimodalModel:
    torch.manual_seed(seed)
    model = mm.build(mm.ModelConfig())
    model.encoder.requires_grad_(not frozen_tower)
    return model


class EncodedImages:
    """Counts the images that go through ``encoder`` and keeps its last output."""

    def __init__(self, encoder: torch.nn.Module):
        self.count, self.output = 0, None
        encoder.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.count += inputs[0].shape[0]
        self.output = output


def _preference_batch(model) -> dict:
    """Two pairs; the first prompt holds two images, the second one; chosen and rejected share them."""
    def side(images: int, answer: str):
        content = [{"type": "image"}] * images + [{"type": "text", "text": "what colour is it?"}]
        return model.tokenize([{"role": "user", "content": content}, {"role": "assistant", "content": answer}],
                              add_generation_prompt=False)

    pairs = [(side(2, "red and green"), side(2, "blue")), (side(1, "a yellow square"), side(1, "two circles"))]
    width = max(len(ids) for pair in pairs for ids, _ in pair)
    pad = model.tokenizer.pad_token_id
    pixels = model.preprocess([_image(1), _image(2), _image(3)])

    def collate(rows):
        return {"input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
                "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows]),
                "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
                "pixel_values": pixels}

    return {"chosen": collate([p[0] for p in pairs]), "rejected": collate([p[1] for p in pairs])}


def _embed(model, images: int = 2):
    content = [{"type": "image"}] * images + [{"type": "text", "text": "describe"}]
    ids, _ = model.tokenize([{"role": "user", "content": content}])
    return model.embed(torch.tensor([ids]), model.preprocess([_image(i) for i in range(images)]))


def test_frozen_tower_keeps_no_autograd_graph_and_the_adapter_learns():
    model = _model()
    encoded = EncodedImages(model.encoder)
    _embed(model).sum().backward()
    assert encoded.output.grad_fn is None and not encoded.output.requires_grad
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapter.parameters())


def test_a_trained_tower_keeps_its_graph():
    """Guard for the test above: the check sees a graph when there is one."""
    model = _model(frozen_tower=False)
    encoded = EncodedImages(model.encoder)
    _embed(model).sum().backward()
    assert encoded.output.grad_fn is not None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())


def test_dpo_encodes_each_image_once_and_matches_encoding_each_side():
    model, reference = _model(seed=0), _model(seed=1)  # a reference that differs: the loss is not log 2
    batch = _preference_batch(model)
    policy_images, reference_images = EncodedImages(model.encoder), EncodedImages(reference.encoder)
    loss, parts = DPOLoss(reference, beta=0.1)(model, batch)
    assert policy_images.count == 3 and reference_images.count == 3  # 3 distinct images, 6 image slots
    pc, pr, _ = pair_logps(model, batch)

    # the old path: each side in its own forward, every image encoded for each
    policy_images.count = 0
    chosen, _ = sequence_logps(model, batch["chosen"])
    rejected, _ = sequence_logps(model, batch["rejected"])
    assert policy_images.count == 6
    with torch.no_grad():
        ref_chosen, _ = sequence_logps(reference, batch["chosen"])
        ref_rejected, _ = sequence_logps(reference, batch["rejected"])
    torch.testing.assert_close(pc, chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pr, rejected, rtol=1e-5, atol=1e-5)
    expected = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1).mean()
    assert abs(float(expected.detach()) - 0.6931) > 1e-3
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)


def test_images_swapped_between_prompts_change_the_log_probs():
    """Guard for the test above: features reaching the wrong placeholders would show in the log-probs."""
    model = _model()
    batch = _preference_batch(model)
    swapped = copy.deepcopy(batch)
    for side in ("chosen", "rejected"):
        swapped[side]["pixel_values"] = batch[side]["pixel_values"][[2, 1, 0]]
    assert not torch.allclose(pair_logps(model, swapped)[0], pair_logps(model, batch)[0])


def test_distinct_images_is_exact():
    torch.manual_seed(0)
    a, b = torch.rand(3, 8, 8), torch.rand(3, 8, 8)
    flipped = a.flip(-1)  # the same pixel sum (up to rounding), other pixels
    pixels = torch.stack([a, b, a, flipped, b, a])
    distinct, index = distinct_images(pixels)
    assert torch.equal(distinct[index], pixels)
    assert len(distinct) == 3 and torch.equal(distinct[0], a) and torch.equal(distinct[1], b)
    assert distinct_images(torch.stack([a, b]))[1] is None


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trained"])
def test_only_a_frozen_tower_is_deduplicated(frozen):
    model = _model(frozen_tower=frozen)
    encoded = EncodedImages(model.encoder)
    pixels = model.preprocess([_image(1), _image(1), _image(2)])
    features = model.encode_images(pixels)
    assert encoded.count == (2 if frozen else 3) and features.shape[0] == 3
    torch.testing.assert_close(features[0], features[1], rtol=1e-6, atol=1e-7)
