"""Loss contracts: LM loss on labelled positions equals the LLM's own loss; KD is 0 for student == teacher;
DPO is log 2 for policy == reference, and its margin grows when training on a toy preference set."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from PIL import Image

import mm
from mm.config import load_config
from mm.train import TrainConfig
from mm.train.losses import DPOLoss, KDLoss, LMLoss, kl_divergence

from train_helpers import TINY, run


def _image(colour):
    return Image.new("RGB", (32, 32), colour)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return mm.build(mm.ModelConfig())


def _lm_batch(model):
    """Two padded rows from model.tokenize + model.preprocess (the loader's contract, unpacked)."""
    rows = []
    for colour, text in (("red", "a red square"), ("blue", "two blue circles on the left")):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]},
                    {"role": "assistant", "content": text}]
        rows.append(model.tokenize(messages, add_generation_prompt=False))
    width = max(len(ids) for ids, _ in rows)
    pad = model.tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask,
            "position_ids": torch.arange(width).expand(2, width).clone(),
            "pixel_values": model.preprocess([_image("red"), _image("blue")])}


def test_lm_loss_equals_full_logits_loss(model):
    batch = _lm_batch(model)
    ours, _ = LMLoss()(model, batch)
    reference = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["position_ids"],
                      labels=batch["labels"]).loss
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kl", ["forward", "reverse", "js"])
def test_kd_is_zero_when_student_is_teacher(model, kl):
    batch = _lm_batch(model)
    loss = KDLoss(copy.deepcopy(model), kl=kl, lm_weight=0.0)
    total, parts = loss(model, batch)
    assert abs(float(parts["mdist"])) < 1e-6 and abs(float(parts["rdist"])) < 1e-6 and abs(float(total)) < 1e-5


def test_kd_is_positive_for_a_different_teacher(model):
    torch.manual_seed(1)
    teacher = mm.build(mm.ModelConfig(llm="tiny-qwen2"))
    _, parts = KDLoss(teacher)(model, _lm_batch(model))
    assert parts["mdist"] > 1e-3 and parts["rdist"] > 0


@pytest.mark.parametrize("teacher, message", [
    ({"adapter": "linear"}, None),  # another adapter, same tokens per image: fine
    ({"adapter": {"name": "resampler", "queries": 8}}, "same tokens per image"),
    ({"encoder": {"name": "tiny-vit", "image_size": 64}, "adapter": {"name": "pool", "size": 4}},
     "same image size"),
    ({"layout": {"name": "dynamic", "max_tiles": 4}}, "lay out images alike"),
])
def test_distillation_refuses_a_teacher_that_reads_batches_differently(model, teacher, message):
    """The teacher runs on the student's batches: token ids, tiles and pixels must mean the same to both."""
    loss = KDLoss(mm.build(mm.ModelConfig(**teacher)))
    if message is None:
        loss.check_student(model)
    else:
        with pytest.raises(mm.MMError, match=message):
            loss.check_student(model)


def test_kl_variants_differ_and_are_non_negative():
    torch.manual_seed(0)
    s, t = torch.randn(5, 11), torch.randn(5, 11)
    values = {k: float(kl_divergence(s, t, k)) for k in ("forward", "reverse", "js")}
    assert all(v > 0 for v in values.values()) and len(set(values.values())) == 3
    assert values["js"] <= math.log(2)


def _preference_batch(model):
    """Toy preference set: same image + question, a right and a wrong answer."""
    def side(answer):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is it?"}]},
                    {"role": "assistant", "content": answer}]
        return model.tokenize(messages, add_generation_prompt=False)

    pairs = [(side("red"), side("blue")), (side("green"), side("yellow"))]
    width = max(len(ids) for pair in pairs for ids, _ in pair)
    pad = model.tokenizer.pad_token_id
    pixels = model.preprocess([_image("red"), _image("green")])

    def collate(rows):
        return {"input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
                "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows]),
                "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
                "position_ids": torch.arange(width).expand(len(rows), width).clone(), "pixel_values": pixels}

    return {"chosen": collate([p[0] for p in pairs]), "rejected": collate([p[1] for p in pairs])}


def test_dpo_is_log2_when_policy_is_reference(model):
    batch = _preference_batch(model)
    loss, parts = DPOLoss(copy.deepcopy(model), beta=0.1)(model, batch)
    assert abs(float(loss) - math.log(2)) < 1e-6 and abs(float(parts["margin"])) < 1e-5


def test_dpo_margin_grows_through_the_engine(model, tmp_path):
    start = tmp_path / "start"
    model.save(start)
    config = load_config(TrainConfig, [TINY / "dpo.yaml"], [
        f"output_dir={tmp_path / 'run'}", f"init_from={start}", "trainer.max_steps=8", "trainer.save_every=8",
        "trainer.warmup_steps=0", "stage.trainable=[{pattern: 'adapter.*', lr: 2.0e-3}, {pattern: 'llm.*', lr: 2.0e-3}]"])
    batch = _preference_batch(mm.load(start))
    run(config, batches=[batch] * 8)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert abs(lines[0]["dpo"] - math.log(2)) < 1e-5  # step 1: policy == reference
    margins = [line["margin"] for line in lines]
    assert margins[-1] > margins[1] > margins[0] and lines[-1]["dpo"] < lines[0]["dpo"]


def test_dpo_uses_precomputed_reference(model):
    batch = _preference_batch(model)
    from mm.train.losses.dpo import pair_logps

    with torch.no_grad():
        rc, rr, _ = pair_logps(model, batch)
    loss, _ = DPOLoss(None)(model, {**batch, "ref_logp_chosen": rc, "ref_logp_rejected": rr})
    assert abs(float(loss) - math.log(2)) < 1e-6
