"""Contract tests driven by the registries: every registered encoder, adapter, LLM family, MoE router and loss is
built from its own ``example``, run, saved and loaded (same logits), and trained one step, with no list kept here.

A part registered anywhere before the tests run (a plugin, or a test module such as test_extending.py) is covered:
each test walks the registry at run time and names every part that breaks its contract.
"""
from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

import mm
from mm.parts import registry
from mm.train.build import TrainModule
from mm.train.stage import apply_stage, train_mode_where_trained

IMAGE = Image.new("RGB", (40, 30), (200, 40, 90))
PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]},
          {"role": "assistant", "content": "a red square"}]


def lm_batch(model, image: Image.Image = IMAGE) -> dict[str, torch.Tensor]:
    """One row, unpacked: the loader's contract (input ids with expanded image tokens, labels, pixels)."""
    ids, labels = model.tokenize(PROMPT, add_generation_prompt=False, images=[image])
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "position_ids": torch.arange(len(ids)).unsqueeze(0), "pixel_values": model.preprocess([image])}


def preference_batch(model) -> dict:
    rows = {}
    for side, answer in (("chosen", "a red square"), ("rejected", "two blue circles")):
        ids, labels = model.tokenize([PROMPT[0], {"role": "assistant", "content": answer}],
                                     add_generation_prompt=False)
        rows[side] = (ids, labels)
    width = max(len(ids) for ids, _ in rows.values())
    pad = model.tokenizer.pad_token_id

    def row(ids, labels):
        return {"input_ids": torch.tensor([ids + [pad] * (width - len(ids))]),
                "labels": torch.tensor([labels + [-100] * (width - len(labels))]),
                "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids))]),
                "position_ids": torch.arange(width).unsqueeze(0), "pixel_values": model.preprocess([IMAGE])}

    return {side: row(*value) for side, value in rows.items()}


def examples(kind: str, workdir) -> list[tuple[str, dict]]:
    """``(name, config section)`` of every registered part of ``kind`` that can be built here."""
    found = []
    for name in registry(kind).names():
        section = registry(kind).entry(name).example(workdir)
        if section is not None:
            found.append((name, section))
    return found


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"]).logits


def one_step_trains_only(model, pattern: str) -> list[str]:
    """One AdamW step of the LM loss with ``pattern`` trainable; returns what broke the stage invariant."""
    from mm.train.losses import LMLoss

    groups = apply_stage(model, [(pattern, 1e-2)])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for g in groups for p in g["params"]], lr=1e-2)
    train_mode_where_trained(model)  # as the loop does: frozen parts (BatchNorm statistics) stay in eval mode
    loss, _ = TrainModule(model, LMLoss())(lm_batch(model))
    loss.backward()
    optimizer.step()
    model.eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    problems = []
    if not math.isfinite(float(loss.detach())):
        problems.append(f"loss {float(loss.detach())}")
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    if not changed & trainable:
        problems.append("no trainable tensor changed")
    if changed - trainable:
        problems.append(f"frozen tensors changed: {sorted(changed - trainable)[:3]}")
    return problems


def check_model(config: mm.ModelConfig, workdir, trainable: str) -> list[str]:
    """Build, forward, save -> load (same logits), one training step."""
    torch.manual_seed(0)
    model = mm.build(config).eval()
    batch = lm_batch(model)
    first = logits(model, batch)
    problems = []
    if first.shape[:2] != batch["input_ids"].shape or not torch.isfinite(first).all():
        problems.append(f"logits {tuple(first.shape)} for input {tuple(batch['input_ids'].shape)}")
    model.save(workdir / "saved")
    again = logits(mm.load(workdir / "saved"), batch)
    if not torch.equal(first, again):
        problems.append(f"save/load changed logits by {float((first - again).abs().max()):.3g}")
    return problems + one_step_trains_only(model, trainable)


def run_contract(kind: str, tmp_path, check) -> None:
    failures = {}
    for name, section in examples(kind, tmp_path):
        workdir = tmp_path / name.replace(":", "_")
        workdir.mkdir(exist_ok=True)
        try:
            problems = check(section, workdir)
        except Exception as exc:  # noqa: BLE001  (report every part, not only the first)
            problems = [f"{type(exc).__name__}: {exc}"]
        if problems:
            failures[name] = problems
    assert not failures, f"{kind}s breaking their contract: {failures}"


def test_every_encoder(tmp_path):
    def check(section, workdir):
        model_config = mm.ModelConfig(encoder=section, adapter="mlp", llm="tiny-llama")
        encoder = mm.build(model_config).encoder.eval()
        pixels = torch.stack([encoder.transform(IMAGE), encoder.transform(IMAGE.rotate(90))])
        problems = []
        if pixels.shape[1:] != (3, encoder.image_size, encoder.image_size):
            problems.append(f"transform gave {tuple(pixels.shape[1:])}")
        with torch.no_grad():
            tokens = encoder(pixels)
        if tokens.shape != (2, encoder.num_tokens, encoder.dim):
            problems.append(f"tokens {tuple(tokens.shape)} != (2, {encoder.num_tokens}, {encoder.dim})")
        return problems + check_model(model_config, workdir, "adapter.*")

    run_contract("encoder", tmp_path, check)


def test_every_adapter(tmp_path):
    def check(section, workdir):
        config = mm.ModelConfig(encoder="tiny-vit", adapter=section, llm="tiny-llama")
        model = mm.build(config)
        tokens = torch.randn(2, model.encoder.num_tokens, model.encoder.dim)
        changed = tokens.clone()
        changed[:, : model.encoder.num_prefix_tokens] *= 100  # prefix tokens (CLS) must not matter
        problems = []
        with torch.no_grad():
            out = model.adapter.eval()(tokens)
            if out.shape != (2, model.tokens_per_image, model.llm.config.hidden_size):
                problems.append(f"adapter output {tuple(out.shape)}")
            if not torch.allclose(model.adapter(changed), out):
                problems.append("the encoder's prefix tokens changed the output")
        return problems + check_model(config, workdir, "adapter.*")

    run_contract("adapter", tmp_path, check)


def test_every_llm_family(tmp_path):
    def check(section, workdir):
        config = mm.ModelConfig(encoder="tiny-vit", adapter="mlp", llm=section)
        model = mm.build(config)
        options = dict(images=[IMAGE], prompt="hi", max_new_tokens=4)
        problems = []
        if model.generate(use_cache=True, **options) != model.generate(use_cache=False, **options):
            problems.append("KV-cache generation differs from generation without cache")
        return problems + check_model(config, workdir, "adapter.*")

    run_contract("llm", tmp_path, check)


def test_every_image_layout(tmp_path):
    """Each layout on a wide image: its tiles' tokens reach the LLM, save/load keeps the layout, one step trains."""
    wide = Image.new("RGB", (120, 30), (20, 200, 90))

    def check(section, workdir):
        config = mm.ModelConfig(encoder="tiny-vit", adapter="mlp", llm="tiny-llama", layout=section)
        torch.manual_seed(0)
        model = mm.build(config).eval()
        batch = lm_batch(model, wide)
        tiles = batch["pixel_values"].shape[0]
        image_tokens = int((batch["input_ids"] == model.image_token_id).sum())
        problems = []
        if image_tokens != tiles * model.tokens_per_image:
            problems.append(f"{image_tokens} image tokens for {tiles} tiles of {model.tokens_per_image}")
        first = logits(model, batch)
        model.save(workdir / "saved")
        loaded = mm.load(workdir / "saved")
        if loaded.config.layout != model.config.layout or not torch.equal(first, logits(loaded, batch)):
            problems.append("save/load changed the layout or the logits")
        return problems

    run_contract("layout", tmp_path, check)


def test_every_moe_router(tmp_path):
    def check(section, workdir):
        config = mm.ModelConfig(encoder="tiny-vit", adapter="mlp", llm="tiny-llama", moe=mm.MoEConfig(router=section))
        return check_model(config, workdir, "moe.*")

    run_contract("router", tmp_path, check)


@pytest.fixture(scope="module")
def moe_start(tmp_path_factory):
    """A tiny student with top-k modality experts (which produce the balance loss), saved as init_from."""
    torch.manual_seed(0)
    topk = {"name": "topk", "num_experts": 2, "top_k": 1, "aux_loss_coef": 0.5}
    model = mm.build(mm.ModelConfig(moe=mm.MoEConfig(router=topk)))
    directory = tmp_path_factory.mktemp("moe-start")
    model.save(directory)
    return directory


def test_every_loss_trains_and_gets_the_auxiliary_losses(moe_start, tmp_path):
    """Each loss: finite, named parts, gradients reach the trainable adapter, and the MoE balance loss is part
    of the total whatever the loss (the loop adds auxiliary losses for every loss)."""
    from mm.config import load_config
    from mm.train import TrainConfig
    from mm.train.build import build_checked_loss

    def check(section, workdir):
        config = load_config(TrainConfig, [], [f"init_from={moe_start}", "stage.trainable=['adapter.*']"])
        config.stage.loss = section
        config.stage.__post_init__()
        student = mm.load(moe_start)
        loss_fn = build_checked_loss(config, student)
        apply_stage(student, [("adapter.*", 1e-3), ("moe.*", 1e-3)])
        batch = preference_batch(student) if loss_fn.data_kind == "preference" else lm_batch(student)
        train_mode_where_trained(student)
        total, parts = TrainModule(student, loss_fn)(batch)
        alone, _ = loss_fn(student, batch)
        problems = []
        if not math.isfinite(float(total.detach())) or not parts:
            problems.append(f"loss {float(total.detach())}, parts {sorted(parts)}")
        if "moe_aux" not in parts or float(parts["moe_aux"]) <= 0:
            problems.append(f"the MoE balance loss is missing from the parts {sorted(parts)}")
        elif abs(float(total.detach() - alone.detach() - parts["moe_aux"])) > 1e-5:
            problems.append(f"total {float(total.detach())} != loss {float(alone.detach())} + moe_aux {float(parts['moe_aux'])}")
        total.backward()
        if all(p.grad is None for p in student.adapter.parameters()):
            problems.append("no gradient reached the adapter")
        return problems

    run_contract("loss", tmp_path, check)
