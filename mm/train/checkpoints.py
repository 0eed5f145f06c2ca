"""Checkpoints: DeepSpeed state (for resume) + an ``mm.load``-able export, written atomically.

Layout of a run directory::

    config.yaml                  the resolved TrainConfig
    metrics.jsonl, tb/           metrics (JSON lines, TensorBoard events)
    checkpoints/step-00000020/   ds/ (engine, optimizer, scheduler state), model/ (mm export), trainer.json,
                                 complete  <- written last, before the rename; only such dirs are resumed from
    final/                       the mm export after the last step (``mm caption --model RUN/final ...``)

Each checkpoint is written under ``checkpoints/.tmp-step-N`` and renamed when complete, so an interrupted save
(even ``kill -9``) never leaves a directory that looks complete.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from mm.checkpoint import save as mm_save

COMPLETE = "complete"
STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def complete_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """``[(step, dir)]`` of complete checkpoints, oldest first."""
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and (child / COMPLETE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest(run: Path) -> tuple[int, Path] | None:
    found = complete_checkpoints(run)
    return found[-1] if found else None


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class _Export:
    """What ``mm.save`` needs of a model, with a given (gathered, LoRA-merged) state dict."""

    def __init__(self, model, state):
        self.config, self.llm, self.tokenizer, self.encoder = model.config, model.llm, model.tokenizer, model.encoder
        self._state = state

    def state_dict(self):
        return self._state


def export_state(model, zero3: bool) -> dict[str, torch.Tensor] | None:
    """The plain model's full state dict (ZeRO-3 partitions gathered, LoRA merged into the base weights and
    PEFT names removed) on rank 0; None elsewhere. Collective under ZeRO-3: every rank must call it."""
    state = _gathered_state(model) if zero3 else (model.state_dict() if _rank() == 0 else None)
    lora = _lora_layers(model)
    if state is None or not lora:
        return state
    for prefix, layer in lora:  # PEFT's delta, from the (gathered) copies: fan_in_fan_out(B @ A) * scaling
        base = state[f"{prefix}.base_layer.weight"]
        a, b = state[f"{prefix}.lora_A.default.weight"], state[f"{prefix}.lora_B.default.weight"]
        delta = (b.float() @ a.float()) * layer.scaling["default"]
        state[f"{prefix}.base_layer.weight"] = base + (delta.T if layer.fan_in_fan_out else delta).to(base.dtype)
    out = {}
    for name, tensor in state.items():
        if ".lora_" in name:
            continue
        name = name.replace("llm.base_model.model.", "llm.", 1).replace(".base_layer.", ".")
        out[name] = tensor
    return out


def _gathered_state(model) -> dict[str, torch.Tensor] | None:
    """Under ZeRO-3: the full state dict on rank 0 (None elsewhere), gathering one module's own parameters at a
    time into CPU copies, so no rank ever holds more than the largest module in full. Tied parameters are
    gathered once and share one copy (``mm.save`` stores them once). Collective: every rank must call it."""
    import deepspeed

    references = model.state_dict(keep_vars=True)  # name -> (partitioned) Parameter or buffer
    copies: dict[int, torch.Tensor] = {}
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in copies]
        if not own:
            continue
        with deepspeed.zero.GatheredParameters(own, modifier_rank=None):
            for p in own:
                copies[id(p)] = p.detach().to("cpu", copy=True) if _rank() == 0 else torch.empty(0)
    if _rank() != 0:
        return None
    return {name: copies.get(id(t), t.detach()) for name, t in references.items()}


def _lora_layers(model) -> list[tuple[str, torch.nn.Module]]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover
        return []
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def export_model(model, directory: Path, zero3: bool) -> None:
    """Atomically write an ``mm.load``-able copy of ``model`` to ``directory`` (collective under ZeRO-3)."""
    state = export_state(model, zero3)
    if state is not None:
        tmp = directory.with_name(f".tmp-{directory.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        mm_save(_Export(model, state), tmp)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    _barrier()


def save_checkpoint(engine, model, run: Path, step: int, trainer_state: dict, keep_last: int, zero3: bool) -> Path:
    """Write ``checkpoints/step-N`` (collective). Returns its path."""
    final = step_dir(run, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    # Frozen weights are not resume state: they come back from the model build (pretrained or init_from).
    engine.save_checkpoint(str(tmp / "ds"), tag="state", client_state={"trainer": trainer_state}, save_latest=False,
                           exclude_frozen_parameters=True)
    export_model(model, tmp / "model", zero3)
    if _rank() == 0:
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        (tmp / COMPLETE).write_text(f"{step}\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in complete_checkpoints(run)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(engine, directory: Path) -> dict:
    """Restore engine, optimizer and scheduler state; returns the saved trainer state."""
    _, client = engine.load_checkpoint(str(directory / "ds"), tag="state", load_optimizer_states=True,
                                       load_lr_scheduler_states=True, load_module_strict=False)
    return client["trainer"]


def clean_partial(run: Path) -> None:
    """Remove leftovers of interrupted saves (rank 0)."""
    for root in (run / "checkpoints", run):
        if root.is_dir():
            for child in root.iterdir():
                if child.name.startswith(".tmp-"):
                    shutil.rmtree(child, ignore_errors=True)
