"""Training throughput of the align stage: ours vs transformers' LlavaForConditionalGeneration.

Same weights (SmolLM2-135M-Instruct + a small random CLIP vision tower saved to a temp dir and given to ours as
``hf:<dir>``, cut at the same layer; the MLP projector copied from ours), same documents, same step: encoder and
LLM frozen, projector trained with AdamW. Ours runs through the real DeepSpeed engine with the training loss
(hidden states, LM head only at labelled positions) on the documents packed into rows (block-diagonal
attention); the baseline is the plain PyTorch loop most LLaVA trainers use: the documents right-padded into a
batch, ``model(..., labels=...)`` (full logits), ``loss.backward()``, ``optimizer.step()``.
A second copy of ours runs with ``trainer.compile=true`` (the decoder under torch.compile; skipped with
``--quick`` or ``--no-compile``): ``train_speedup`` and ``mfu`` are its figures, ``*_eager`` the plain engine's.
Steps alternate; figures are medians. Also: achieved model FLOP/s of ours as a fraction of
this machine's fp32 matmul peak (a large ``torch.mm``, measured in the same run), counting ``4N`` FLOPs per
non-pad token for a frozen-LLM stage (forward 2N + activation gradients 2N; N = LLM parameters without the
input embedding).

    python -m tools.bench.train [--quick] [--no-compile]

The 8 documents of a step are packed into rows of at most 128 tokens for ours (data.seq_len=128; longer rows
cost more attention on CPU than they save).
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
from pathlib import Path

import torch

from tools.bench.timing import matmul_peak, order, seconds


def _tower_dir() -> Path:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    directory = Path(tempfile.mkdtemp(prefix="mm-bench-clip-"))
    config = CLIPVisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3,
                              image_size=64, patch_size=16)
    torch.manual_seed(0)
    CLIPVisionModel(config).save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(directory)
    return directory


def _llava_from(ours, image_id: int):
    """A LlavaForConditionalGeneration holding exactly our weights (tower cut at the same layer)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tower = ours.encoder.model
    vision_config = tower.config
    config = LlavaConfig(vision_config=vision_config.to_dict(), text_config=ours.llm.config.to_dict(),
                         image_token_index=image_id, image_seq_length=ours.tokens_per_image,
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", tie_word_embeddings=ours.llm.config.tie_word_embeddings)
    config.vision_config.num_hidden_layers = len(getattr(tower, "vision_model", tower).encoder.layers)
    llava = LlavaForConditionalGeneration(config).eval()
    missing, unexpected = llava.model.vision_tower.load_state_dict(tower.state_dict(), strict=False)
    if unexpected or any("post_layernorm" not in name for name in missing):
        raise RuntimeError(f"vision tower weights do not match: {missing[:3]} {unexpected[:3]}")
    llava.model.language_model.load_state_dict(ours.llm.model.state_dict())
    llava.lm_head.load_state_dict(ours.llm.lm_head.state_dict())
    projector = llava.model.multi_modal_projector
    projector.linear_1.load_state_dict(ours.adapter.mlp[0].state_dict())
    projector.linear_2.load_state_dict(ours.adapter.mlp[2].state_dict())
    llava.requires_grad_(False)
    projector.requires_grad_(True)
    return llava


def _pack(batch: dict, pad_id: int, width: int) -> dict:
    """The padded batch's documents packed in order into rows of ``width`` (block-diagonal causal mask)."""
    docs = []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        n = int(mask.sum())
        docs.append((ids[:n], labels[:n]))
    rows: list[list] = [[]]
    for doc in docs:
        if rows[-1] and sum(len(d[0]) for d in rows[-1]) + len(doc[0]) > width:
            rows.append([])
        rows[-1].append(doc)
    width = max(sum(len(d[0]) for d in row) for row in rows)
    B = len(rows)
    input_ids = torch.full((B, width), pad_id)
    labels = torch.full((B, width), -100)
    position_ids = torch.zeros((B, width), dtype=torch.long)
    document = torch.full((B, width), -1)
    for b, row in enumerate(rows):
        at = 0
        for d, (ids, lab) in enumerate(row):
            n = len(ids)
            input_ids[b, at:at + n], labels[b, at:at + n] = ids, lab
            position_ids[b, at:at + n] = torch.arange(n)
            document[b, at:at + n] = d
            at += n
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = ((document.unsqueeze(2) == document.unsqueeze(1)) & causal).unsqueeze(1)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": mask,
            "pixel_values": batch["pixel_values"]}


def run(quick: bool = False, compile: bool | None = None) -> dict:
    import mm
    from mm.data import DataConfig, build_loader, make_synthetic
    from mm.train import TrainConfig
    from mm.train.build import TrainModule, compile_decoder
    from mm.train.engine import init_distributed, initialize
    from mm.train.losses import LMLoss
    from mm.train.stage import apply_stage

    compile = (not quick) if compile is None else compile
    torch.manual_seed(0)
    corpus = make_synthetic(Path(tempfile.gettempdir()) / "mm-bench-synthetic", n=200, n_val=20)
    tower = _tower_dir()
    config = TrainConfig(output_dir=tempfile.mkdtemp(prefix="mm-bench-run-"))
    config.model = mm.ModelConfig(encoder=f"hf:{tower}", adapter="mlp", llm="smollm2-135m")
    config.trainer.max_steps, config.trainer.save_every = 1000, 1000
    config.data = DataConfig(train=f"{corpus}/train/interleaved-*.tar", batch_size=8, seq_len=128, pack=False)
    ours = mm.build(config.model)
    llava_image_id = ours.llm.config.vocab_size - 1  # an in-vocabulary id for LLaVA's placeholder
    llava = _llava_from(ours, llava_image_id)

    init_distributed()

    def engine_for(model, compile: bool):
        config.trainer.compile = compile
        groups = apply_stage(model, [("adapter.*", 1e-4)])
        compile_decoder(model, config)
        engine = initialize(TrainModule(model, LMLoss()), groups, config)
        engine.train()
        return engine

    engines = {"ours": engine_for(ours, False)}
    best = "ours"  # the engine whose figures are the headline ones
    if compile:  # a second copy of ours (same weights) with trainer.compile=true
        twin = mm.build(config.model)
        twin.load_state_dict(ours.state_dict())
        engines["ours_compiled"] = engine_for(twin, True)
        best = "ours_compiled"
    optimizer = torch.optim.AdamW([p for p in llava.parameters() if p.requires_grad], lr=1e-4)
    llava.train()

    pad_id = ours.tokenizer.pad_token_id
    batches = iter(build_loader(config.data, ours, kind="interleaved"))

    def ours_step(engine, batch):
        loss, _ = engine(_pack(batch, pad_id, config.data.seq_len))
        engine.backward(loss)
        engine.step()

    def llava_step(batch):
        ids = batch["input_ids"].masked_fill(batch["input_ids"] == ours.image_token_id, llava_image_id)
        labels = batch["labels"]
        out = llava(input_ids=ids, pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"],
                    labels=labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    rounds = 3 if quick else 8
    warmup = 2 if compile else 1  # compiling: the first steps compile, a new row count may recompile once
    steps = {name: functools.partial(ours_step, engine) for name, engine in engines.items()}
    steps["llava"] = llava_step
    names = list(steps)
    rates = {name: [] for name in names}
    ratios = {name: [] for name in engines}
    samples, peaks = [], []
    for i in range(rounds + warmup):
        batch = next(batches)
        tokens = int(batch["attention_mask"].sum())
        times = {name: seconds(functools.partial(steps[name], batch)) for name in order(names, i)}
        peaks.append(matmul_peak())  # fp32, 2048 x 2048, best of 5
        if i < warmup:
            continue
        for name in names:
            rates[name].append(tokens / times[name])
        for name in engines:
            ratios[name].append(times["llava"] / times[name])
        samples.append(config.data.batch_size / times[best])
    n_params = sum(p.numel() for p in ours.llm.parameters()) - ours.llm.get_input_embeddings().weight.numel()
    if ours.llm.config.tie_word_embeddings:
        n_params += ours.llm.get_input_embeddings().weight.numel()  # the LM head still multiplies by it
    peak = statistics.median(peaks)
    tps = {name: statistics.median(values) for name, values in rates.items()}
    return {
        "train_speedup": round(statistics.median(ratios[best]), 3),  # ours tokens/s over LLaVA's, same batches
        "train_speedup_eager": round(statistics.median(ratios["ours"]), 3),
        "ours": best,
        "ours_tokens_per_s": round(tps[best], 1),
        "ours_eager_tokens_per_s": round(tps["ours"], 1),
        "llava_hf_tokens_per_s": round(tps["llava"], 1),
        "llm_params_N": n_params,
        "ours_model_flops_per_s": round(4 * n_params * tps[best] / 1e9, 2),
        "matmul_peak_gflops": round(peak / 1e9, 2),
        "mfu": round(4 * n_params * tps[best] / peak, 3),  # useful FLOPs (4N per token, frozen LLM) / peak
        "mfu_eager": round(4 * n_params * tps["ours"] / peak, 3),
        "train_samples_per_s": round(statistics.median(samples), 2),
        "rounds": rounds,
        "batch": f"{config.data.batch_size} documents (padded for LLaVA, packed into <= {config.data.seq_len}-token rows for ours)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-compile", dest="compile", action="store_false", default=None)
    args = parser.parse_args()
    print(json.dumps(run(quick=args.quick, compile=args.compile), indent=2))


if __name__ == "__main__":
    main()
