"""The one training loop: every stage differs only in its trainable set, data and loss.

``train(config)`` builds the student, applies LoRA and the stage, starts the DeepSpeed engine, resumes from the
newest complete checkpoint of ``output_dir`` (engine state + data position), steps to ``trainer.max_steps``
with a progress bar (loss, tokens/s, ETA), JSON-lines and TensorBoard metrics, periodic checkpoints, and writes
``output_dir/final``.
"""
from __future__ import annotations

import json
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
from mm.train.build import TrainModule, apply_lora, build_loss, build_student, compile_decoder, frozen_models
from mm.train.config import TrainConfig, validate
from mm.train.engine import initialize, init_distributed
from mm.train.stage import apply_stage, parameter_table, parse_trainable, train_mode_where_trained


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


def build_batches(config: TrainConfig, model, skip_batches: int) -> Iterable[dict]:
    from mm.data import build_loader

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    kind = config.stage.kind or ("preference" if config.stage.loss == "dpo" else None)
    return build_loader(config.data, model, rank=rank, world_size=world, skip_batches=skip_batches, kind=kind)


class Metrics:
    """JSON lines + TensorBoard in the run dir (rank 0). On resume, lines after the resumed step are dropped."""

    def __init__(self, run: Path, start_step: int, enabled: bool):
        self.enabled = enabled
        self.path = run / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= start_step:
                        kept.append(line)
                except json.JSONDecodeError:  # a line cut short by a crash
                    continue
            self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run / "tb"), purge_step=start_step + 1 if start_step else None)
        except ImportError:  # pragma: no cover
            self.writer = None

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def save_resolved(config: TrainConfig, run: Path) -> None:
    run.mkdir(parents=True, exist_ok=True)
    tmp = run / ".config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    tmp.replace(run / "config.yaml")


def train(config: TrainConfig, batches: Iterable[dict] | None = None, progress: bool = True) -> Path:
    """Run (or resume) a stage. ``batches`` replaces ``mm.data.build_loader`` (tests, benchmarks): it must
    already start at the resumed position. Returns ``output_dir/final``."""
    validate(config, need_data=batches is None)
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
    compile_decoder(model, config)
    loss_fn = build_loss(config, model)
    if rank == 0:
        save_resolved(config, run)
        checkpoints.clean_partial(run)
        print(parameter_table(model), flush=True)
    engine = initialize(TrainModule(model, loss_fn), groups, config)
    model = engine.module.model
    compute_dtype = torch.bfloat16 if t.precision == "bf16" else torch.float32
    for frozen in frozen_models(loss_fn):
        frozen.to(engine.device, compute_dtype)
    train_mode_where_trained(engine.module)

    start_step, resumed = 0, checkpoints.latest(run)
    if resumed is not None:
        state = checkpoints.load_checkpoint(engine, resumed[1])
        start_step = state["step"]
        if rank == 0:
            print(f"resuming from {resumed[1]} (step {start_step})", flush=True)
    if batches is None:
        batches = build_batches(config, model, skip_batches=start_step * t.grad_accum)
    iterator: Iterator[dict] = iter(batches)

    metrics = Metrics(run, start_step, enabled=rank == 0)
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
        for _ in range(t.grad_accum):
            try:
                batch = next(iterator)
            except StopIteration:
                raise MMError("the data ran out before trainer.max_steps (set data.resample=true)") from None
            tokens += count_tokens(batch, pad_id)
            loss, parts = engine(_to(batch, engine.device, compute_dtype))
            engine.backward(loss)
            engine.step()
            for key, value in {"loss": loss.detach(), **parts}.items():
                sums[key] = sums.get(key, 0.0) + float(value) / t.grad_accum
        window_tokens += tokens
        if step % t.log_every == 0 or step == t.max_steps:
            counted = torch.tensor([window_tokens], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(counted)
            elapsed = max(time.perf_counter() - window_start, 1e-9)
            values = {**sums, "lr": lr, "tokens_per_s": float(counted) / elapsed}
            norm = engine.get_global_grad_norm()
            if norm is not None:
                values["grad_norm"] = float(norm)
            metrics.log(step, values)
            if bar is not None:
                bar.set_postfix(loss=f"{sums['loss']:.4f}", tok_s=f"{values['tokens_per_s']:.0f}", refresh=False)
            window_tokens, window_start = 0, time.perf_counter()
        if bar is not None:
            bar.update(1)
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
