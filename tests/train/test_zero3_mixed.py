"""ZeRO-3 with mixed batches: two real processes where one rank's batch has no image while the other's has some,
and image counts differ between ranks, must neither hang nor fail. Under ZeRO-3 every module call gathers that
module's partitioned parameters with a collective, and every trained parameter's gradient is reduced with one, so
a rank that skips the vision tower (or an expert) while the other runs it waits forever.

Unit tests beside it: a text-only batch runs the tower only in ``lockstep`` (training), generation never does, and
in lockstep every expert projection runs in every pass with the same output.

The parameter persistence threshold is 0 so that the tiny models' parameters are really partitioned (by default
DeepSpeed keeps parameters under 1e5 elements whole on every rank, and nothing would be gathered). The test file
is also the worker script the two processes run (``python -m torch.distributed.run ... test_zero3_mixed.py``).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train_helpers import ROOT, TINY, subprocess_env

# Images in each rank's batch, per step: rank 0 text-only while rank 1 has two; then uneven counts; then reversed.
PLAN = [(0, 2), (1, 3), (2, 0)]
TIMEOUT_S = 420  # a hang shows as this timeout

SCENARIOS = {
    # frozen tower + trained adapter, frozen LLM (LLaVA stage 1)
    "align": ("1_align.yaml", []),
    # trained tower + adapter + modality FFN and attention experts, frozen LLM (Mono-InternVL EViP)
    # (with gradient checkpointing: the recomputation gathers the same modules on both ranks)
    "experts": ("evip_s1_1.yaml", ["model.freeze_encoder=false", "model.moe.attn_experts=true",
                                   "stage.trainable=[encoder.*, adapter.*, moe.*]",
                                   "trainer.gradient_checkpointing=true"]),
    # learned top-k router: every expert must run (and get a gradient) on every rank in every step
    "topk": ("evip_s1_1.yaml", ["model.moe.router={name: topk, num_experts: 16, top_k: 1}",
                                "stage.trainable=[{pattern: 'adapter.*', lr: 1e-3}, {pattern: 'moe.*', lr: 1e-3}]"]),
}


def conversation(images: int, seed: int) -> list[dict]:
    content = [{"type": "image"}] * images + [{"type": "text", "text": f"how many shapes are there {seed}"}]
    return [{"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": f"there are {seed % 7} red circles"}]}]


def batch_with(model, images: int, seed: int) -> dict[str, torch.Tensor]:
    """Two right-padded rows; the first holds all ``images`` (none: a text-only batch)."""
    from PIL import Image

    rows = [model.tokenize(conversation(n, seed + r), add_generation_prompt=False) for r, n in enumerate([images, 0])]
    width = max(len(ids) for ids, _ in rows)
    pad = model.tokenizer.pad_token_id
    batch = {
        "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
        "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
    }
    if images:
        generator = torch.Generator().manual_seed(seed)
        pictures = [Image.fromarray(torch.randint(0, 256, (40, 40, 3), generator=generator, dtype=torch.uint8).numpy())
                    for _ in range(images)]
        batch["pixel_values"] = model.preprocess(pictures)
    return batch


def worker(out: Path, names: list[str]) -> None:
    """One rank: train each scenario for len(PLAN) steps on this rank's batches."""
    import mm
    from mm.config import load_config
    from mm.train import TrainConfig
    from mm.train.loop import train

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    ds_config = out / "ds_zero3.json"
    for name in names:
        recipe, overrides = SCENARIOS[name]
        config = load_config(TrainConfig, [TINY / recipe], [
            f"output_dir={out / name}", f"trainer.max_steps={len(PLAN)}", f"trainer.save_every={len(PLAN)}",
            "trainer.zero_stage=3", f"trainer.deepspeed_config={ds_config}", "data.batch_size=2", *overrides])
        torch.manual_seed(0)
        shapes = mm.build(config.model)  # its tokenizer and image transform make the batches
        batches = [batch_with(shapes, counts[rank], seed=10 * step + rank) for step, counts in enumerate(PLAN)]
        print(f"rank {rank}: {name} starts", file=sys.stderr, flush=True)
        train(config, batches=batches, progress=False)
        print(f"rank {rank}: {name} done", file=sys.stderr, flush=True)


def _calls(module: torch.nn.Module) -> list[int]:
    count = [0]
    module.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


@pytest.mark.parametrize("lockstep", [True, False], ids=["training", "inference"])
def test_a_text_only_batch_runs_the_tower_in_lockstep_only(lockstep):
    """Training (``lockstep``): a batch without images encodes one blank image, with weight 0 (same embeddings;
    the adapter gets a zero gradient). Inference (the guard): the tower does not run."""
    import mm

    torch.manual_seed(0)
    model = mm.build(mm.ModelConfig())
    model.lockstep = lockstep
    tower = _calls(model.encoder)
    batch = batch_with(model, 0, seed=1)
    embeddings = model.embed(batch["input_ids"])
    assert tower[0] == (1 if lockstep else 0)
    model.lockstep = False
    torch.testing.assert_close(embeddings, model.embed(batch["input_ids"]), rtol=0, atol=0)
    if lockstep:  # (the LLM is frozen: without the blank image nothing here needs a gradient)
        embeddings.sum().backward()
        assert all(p.grad is not None and not p.grad.any() for p in model.adapter.parameters())
    else:
        assert embeddings.grad_fn is None


def test_generation_from_the_training_model_is_not_in_lockstep():
    """Eval tasks generate with the model being trained: no blank image for a text-only prompt."""
    import mm

    torch.manual_seed(0)
    model = mm.build(mm.ModelConfig())
    model.lockstep = True
    tower = _calls(model.encoder)
    for temperature in (0.0, 1.0):  # the greedy fast path and transformers' generate
        model.generate(prompt="describe a red circle", max_new_tokens=2, temperature=temperature)
    assert tower[0] == 0 and model.lockstep


@pytest.mark.parametrize("router", ["modality", "topk"])
def test_every_expert_runs_in_lockstep(router):
    """Training: every expert and the FFN's own modules run in every pass, on zero rows when no token goes there
    (a text-only batch for modality experts; top-k experts no token chose), same output. Inference skips them."""
    import mm

    options = {"name": "topk", "num_experts": 16, "top_k": 1} if router == "topk" else "modality"
    torch.manual_seed(0)
    model = mm.build(mm.ModelConfig(encoder={"name": "patch:32", "image_size": 56}, adapter="pixel-shuffle",
                                    moe=mm.MoEConfig(ffn_experts=True, attn_experts=router == "modality",
                                                     router=options)))
    counts = [_calls(m) for m in model.moe.modules() if isinstance(m, torch.nn.Linear)]  # every expert projection
    batch = batch_with(model, 0 if router == "modality" else 1, seed=1)
    outputs = {}
    for lockstep in (False, True):
        model.lockstep = lockstep
        for count in counts:
            count[0] = 0
        with torch.no_grad():
            outputs[lockstep] = model(batch["input_ids"], batch.get("pixel_values"), batch["attention_mask"]).logits
        ran = sum(count[0] > 0 for count in counts)
        assert (ran == len(counts)) if lockstep else (ran < len(counts)), (lockstep, ran, len(counts))
    torch.testing.assert_close(outputs[True], outputs[False], rtol=0, atol=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_zero3_text_only_rank_and_uneven_image_counts_do_not_hang(tmp_path):
    (tmp_path / "ds_zero3.json").write_text(json.dumps({
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "gradient_clipping": "auto", "bf16": "auto"}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           __file__, str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
        output, _ = proc.communicate()
        pytest.fail(f"ZeRO-3 mixed batches hung (> {TIMEOUT_S} s):\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    import mm

    for name in SCENARIOS:
        trained = mm.load(tmp_path / name / "final")
        torch.manual_seed(0)
        start = mm.build(trained.config)
        changed = [n for (n, p), q in zip(trained.named_parameters(), start.parameters()) if not torch.equal(p, q)]
        assert changed and all(n.startswith(("adapter.", "encoder.", "moe.")) for n in changed), (name, changed)
        if name != "align":
            assert any(n.startswith("moe.") for n in changed), name


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2:] or list(SCENARIOS))
