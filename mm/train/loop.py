"""The one training loop: every stage differs only in its trainable set, data and loss.

``train(config)`` builds the student, applies LoRA and the stage, starts the DeepSpeed engine, resumes from the
newest complete checkpoint of ``output_dir`` (engine state + data position), steps to ``trainer.max_steps``
(or through ``trainer.epochs`` passes) with a progress bar (loss, tokens/s, ETA), metrics (``mm.train.metrics``:
JSON lines and the ``report_to`` trackers, ``grad_norm`` included), the held-out loss on ``data.val`` every
``trainer.eval_every`` steps (``mm.train.validation``), periodic checkpoints, and writes ``output_dir/final``.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from mm.config import to_dict
from mm.errors import MMError
from mm.train import checkpoints
from mm.train.build import (TrainModule, apply_lora, build_checked_loss, build_student, choose_attention,
                            compile_decoder)
from mm.train.config import TrainConfig, validate
from mm.train.engine import initialize, init_distributed
from mm.train.epochs import epoch_batches, epoch_of, plan_epochs
from mm.train.metrics import Metrics, grad_norm
from mm.train.preflight import preflight
from mm.train.resume import Resume
from mm.train.stage import apply_stage, parameter_table, parse_trainable, train_mode_where_trained
from mm.train.validation import EvalTasks, Validation


def _to(batch: Any, device, dtype) -> Any:
    """Move a (nested) batch to the device; pixel values to the compute dtype (log-probs stay float32)."""
    if isinstance(batch, dict):
        return {k: (v.to(device, dtype) if k == "pixel_values" else _to(v, device, dtype)) for k, v in batch.items()}
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    return batch


def count_tokens(batch: dict, pad_id: int) -> int:
    """Non-pad tokens of a (preference) batch."""
    if "chosen" in batch:
        return count_tokens(batch["chosen"], pad_id) + count_tokens(batch["rejected"], pad_id)
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    return int((batch["input_ids"] != pad_id).sum())


def build_batches(config: TrainConfig, model, skip_batches: int, loss_kind: str | None,
                  passes: list[int] | None = None) -> Iterable[dict]:
    """The training stream; with ``passes`` (micro-batches per pass, ``trainer.epochs``), those passes in turn."""
    from mm.data import build_loader

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    kind = config.stage.kind or loss_kind
    if passes is not None:
        return epoch_batches(config.data, model, kind, passes, skip_batches)
    return build_loader(config.data, model, rank=rank, world_size=world, skip_batches=skip_batches, kind=kind)


def save_resolved(config: TrainConfig, run: Path) -> None:
    run.mkdir(parents=True, exist_ok=True)
    tmp = run / ".config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    tmp.replace(run / "config.yaml")


def train(config: TrainConfig, batches: Iterable[dict] | None = None, progress: bool = True,
          allow_config_change: bool = False) -> Path:
    """Run (or resume) a stage. ``batches`` replaces ``mm.data.build_loader`` (tests, benchmarks): it must
    already start at the resumed position. ``allow_config_change`` resumes under a config whose changes the
    resume check would refuse (mm/train/resume.py). Returns ``output_dir/final``."""
    validate(config, need_data=batches is None)
    resume = Resume(config, Path(config.output_dir), allow_config_change)  # a changed config: before any build
    preflight(config, need_data=batches is None)  # before DeepSpeed and any weight: a typo fails in seconds
    init_distributed()
    rank = dist.get_rank()
    world = dist.get_world_size()
    run = Path(config.output_dir)
    t = config.trainer
    zero3 = t.zero_stage == 3

    if batches is None:  # fail on missing shards before minutes of model building
        from mm.data import list_shards

        for source in config.data.train if isinstance(config.data.train, list) else [config.data.train]:
            list_shards(source)
    model = build_student(config)
    apply_lora(model, config)
    groups = apply_stage(model, parse_trainable(config.stage.trainable, t.lr))
    choose_attention(config, model)  # packed rows: document-masked attention, probed, logged once
    compile_decoder(model, config)
    loss_fn = build_checked_loss(config, model)
    resume.record_base(model, loss_fn)  # digest of the frozen weights, before ZeRO-3 partitions them
    passes = None
    if t.epochs:  # the LR schedule and the stop need the run's length: count each pass's batches now
        passes, t.max_steps = plan_epochs(config.data, model, config.stage.kind or loss_fn.data_kind, t.epochs,
                                          t.grad_accum, t.max_steps)
    if rank == 0:
        save_resolved(config, run)
        checkpoints.clean_partial(run)
        print(parameter_table(model), flush=True)
    engine = initialize(TrainModule(model, loss_fn), groups, config)
    model = engine.module.model
    compute_dtype = torch.bfloat16 if t.precision == "bf16" else torch.float32
    for frozen in loss_fn.frozen_models().values():
        frozen.to(engine.device, compute_dtype)
    train_mode_where_trained(engine.module)

    start_step = resume.load(engine)  # newest complete checkpoint that loads; 0 for a fresh run
    if batches is None:
        batches = build_batches(config, model, skip_batches=start_step * t.grad_accum, loss_kind=loss_fn.data_kind,
                                passes=passes)
    iterator: Iterator[dict] = iter(batches)

    metrics = Metrics(run, start_step, enabled=rank == 0, report_to=t.report_to, params=to_dict(config))
    validation = Validation(config, model, config.stage.kind or loss_fn.data_kind) if config.data.val else None
    tasks = EvalTasks(t.eval_tasks) if t.eval_tasks else None
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=t.max_steps, initial=start_step, desc=config.stage.name, dynamic_ncols=True)
    pad_id = model.tokenizer.pad_token_id
    window_tokens, window_start = 0, time.perf_counter()
    for step in range(start_step + 1, t.max_steps + 1):
        sums: dict[str, float] = {}
        tokens = 0
        lr = engine.get_lr()[0]  # the rate this step's update uses
        log_due = step % t.log_every == 0 or step == t.max_steps
        own_norm = None
        for micro in range(t.grad_accum):
            try:
                batch = next(iterator)
            except StopIteration:
                raise MMError("the data ran out before trainer.max_steps (set data.resample=true)") from None
            tokens += count_tokens(batch, pad_id)
            loss, parts = engine(_to(batch, engine.device, compute_dtype))
            engine.backward(loss)
            if log_due and micro == t.grad_accum - 1 and engine.zero_optimization_stage() == 0:
                own_norm = grad_norm(trainable)  # DeepSpeed gives none without ZeRO: the grads before the step
            engine.step()
            for key, value in {"loss": loss.detach(), **parts}.items():
                sums[key] = sums.get(key, 0.0) + float(value) / t.grad_accum
        window_tokens += tokens
        if log_due:
            counted = torch.tensor([window_tokens], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(counted)
            elapsed = max(time.perf_counter() - window_start, 1e-9)
            values = {**sums, "lr": lr, "tokens_per_s": float(counted) / elapsed}
            norm = engine.get_global_grad_norm()
            norm = own_norm if norm is None else norm
            if norm is not None:
                values["grad_norm"] = float(norm)
            if passes is not None:
                values["epoch"] = epoch_of(passes, step * t.grad_accum)
            if hasattr(batches, "metrics"):  # mm.data's loader: documents used and skipped, by reason (this rank)
                values.update(batches.metrics())
            metrics.log(step, values)
            if bar is not None:
                bar.set_postfix(loss=f"{sums['loss']:.4f}", tok_s=f"{values['tokens_per_s']:.0f}", refresh=False)
            window_tokens, window_start = 0, time.perf_counter()
        if bar is not None:
            bar.update(1)
        if (validation or tasks) and (step % (t.eval_every or t.max_steps) == 0 or step == t.max_steps):
            held_out = validation(lambda b: engine(_to(b, engine.device, compute_dtype)), engine.module) \
                if validation else {}
            held_out.update(tasks(model) if tasks else {})
            train_mode_where_trained(engine.module)
            metrics.log(step, held_out)
            if rank == 0:
                shown = ", ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in held_out.items())
                (bar.write if bar is not None else print)(f"step {step}: eval {shown}")
        if step % t.save_every == 0 or step == t.max_steps:
            checkpoints.save_checkpoint(engine, model, run, step, {"step": step, "micro_batches": step * t.grad_accum},
                                        t.keep_last, zero3)
    if bar is not None:
        bar.close()
    metrics.close()
    final = run / "final"
    checkpoints.export_model(model, final, zero3)
    if rank == 0:
        print(f"final model: {final}", flush=True)
    return final
