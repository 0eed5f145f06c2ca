"""Checkpoints: what trains (DeepSpeed state) + what rebuilds the rest, written atomically; the final export.

Layout of a run directory::

    config.yaml, base.json       the resolved TrainConfig; what rebuilds the frozen weights + their digest (resume.py)
    metrics.jsonl, tb/           metrics (JSON lines, TensorBoard events)
    checkpoints/step-00000020/   ds/state/*.pt   DeepSpeed: trainable parameters (+ buffers), optimizer, scheduler
                                 config.yaml, base.json   copies of the run's, as they were at this step
                                 checkpoint.json  trainer state, every file with its size, the bytes of state held
                                 complete  <- written last, before the rename; only such dirs are resumed from
    final/                       the mm export after the last step (``mm caption --model RUN/final ...``)

Frozen weights are never copied into a checkpoint: resume rebuilds them (``init_from`` or the model config) and
checks their digest against ``base.json``. Each checkpoint is written under ``checkpoints/.tmp-step-N`` and renamed
when complete, so an interrupted save (even ``kill -9``) never leaves a directory that looks complete.

DeepSpeed writes its state with ``torch.save`` and reads it with ``torch.load(weights_only=False)``, which runs
whatever code a planted file names. ``use_safe_checkpoints`` swaps in a checkpoint engine that unpickles with
``weights_only=True``, allowing tensors, plain containers and DeepSpeed's own state classes (``SAFE_GLOBALS``) only.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mm.checkpoint import save as mm_save
from mm.errors import MMError

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


MANIFEST = "checkpoint.json"
RUN_FILES = ("config.yaml", "base.json")  # the run's identity, snapshot into every checkpoint


def _tensor_bytes(obj: Any, seen: set | None = None) -> int:
    """Bytes of the tensors in a nested state (each tensor once)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = (obj.data_ptr(), obj.numel(), obj.dtype)
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def state_bytes(engine, model) -> dict[str, int]:
    """Bytes of the trainable parameters (full size, in their dtype) and of the optimizer's state tensors
    (moments, fp32 master copies; every rank's partition summed). Collective when distributed."""
    trainable = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in model.parameters() if p.requires_grad)
    optimizer = _tensor_bytes(engine.optimizer.state_dict())
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [0] * dist.get_world_size()
        dist.all_gather_object(gathered, optimizer)
        optimizer = sum(gathered)
    return {"trainable": trainable, "optimizer": optimizer}


def _files(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def save_checkpoint(engine, model, run: Path, step: int, trainer_state: dict, keep_last: int, zero3: bool) -> Path:
    """Write ``checkpoints/step-N`` (collective): the trainable state, the run's config and base reference, a
    manifest; then mark it complete, rename it into place and drop all but the newest ``keep_last``."""
    use_safe_checkpoints(engine)
    final = step_dir(run, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    # Frozen weights are not resume state: they come back from the model build (pretrained or init_from).
    engine.save_checkpoint(str(tmp / "ds"), tag="state", client_state={"trainer": trainer_state}, save_latest=False,
                           exclude_frozen_parameters=True)
    held = state_bytes(engine, model)
    if _rank() == 0:
        for script in (tmp / "ds").glob("*.py"):  # DeepSpeed's zero_to_fp32 converters: RUN/final is the export
            script.unlink()
        for name in RUN_FILES:
            if (run / name).is_file():
                shutil.copyfile(run / name, tmp / name)
        files = _files(tmp)
        manifest = {"step": step, "trainer": trainer_state, "files": files,
                    "bytes": {"files": sum(files.values()), **held}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / COMPLETE).write_text(f"{step}\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in complete_checkpoints(run)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


# ---- loading without unpickling code ------------------------------------------------------------------------

class Unloadable(Exception):
    """A complete-marked checkpoint whose files do not load (truncated, corrupt, or a pickle that names code)."""


def safe_globals() -> list:
    """DeepSpeed's classes that its state files hold (ZeRO 1-3 optimizer states, fp16/bf16 loss scalers)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with DeepSpeed's state classes allowed; Unloadable (one line) otherwise."""
    name = Path(path).name
    try:
        with torch.serialization.safe_globals(safe_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Detected pickle protocol 4": the refusal below says what matters
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle_errors() as exc:
        text = str(exc)
        named = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if named:
            raise Unloadable(f"{name} names {named.group(1)}, code that unpickling would run; resume unpickles "
                             f"tensors and DeepSpeed's state classes only") from None
        opcode = re.search(r"Unsupported operand (\S+)", text)
        if opcode:
            raise Unloadable(f"{name} holds pickle opcode {opcode.group(1)}, which no tensor file needs; resume "
                             f"unpickles tensors and DeepSpeed's state classes only") from None
        first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
        raise Unloadable(f"{name}: {first}") from None


def pickle_errors() -> tuple[type[BaseException], ...]:
    import pickle

    return (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, TypeError, AttributeError, KeyError,
            IndexError, UnicodeDecodeError, ImportError)


def module_names(module: torch.nn.Module) -> tuple[set[str], set[str]]:
    """The names a checkpoint's module state holds: ``(trainable parameters, every alias of a tied one included;
    buffers)``."""
    trainable = {n for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}
    return trainable, {n for n, _ in module.named_buffers(remove_duplicate=False)}


def _checkpoint_engine_class():
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine: the module state it saves holds ``keep`` only (DeepSpeed's
        ``exclude_frozen_parameters`` misses the second name of a tied frozen weight, e.g. SmolLM2's
        ``lm_head.weight`` = ``embed_tokens.weight``, 113 MB); it loads with ``weights_only=True``, serving the
        files prefetched (and so checked) before DeepSpeed applies any state from memory."""

        def __init__(self, config_params=None, keep: set[str] | None = None):
            super().__init__(config_params)
            self.keep = keep
            self.prefetched: dict[str, Any] = {}

        def save(self, state_dict, path: str):
            module = state_dict.get("module") if isinstance(state_dict, dict) else None
            if self.keep is not None and isinstance(module, dict):
                state_dict = {**state_dict, "module": type(module)((k, v) for k, v in module.items() if k in self.keep)}
            super().save(state_dict, path)

        def prefetch(self, paths: list[Path]) -> None:
            self.prefetched = {}
            for path in paths:
                self.prefetched[os.path.realpath(path)] = safe_load(path)

        def load(self, path, map_location=None):
            cached = self.prefetched.pop(os.path.realpath(path), None)
            return cached if cached is not None else safe_load(path)  # DeepSpeed maps every load to the CPU

    return SafeCheckpointEngine


def use_safe_checkpoints(engine) -> None:
    """Give the engine the checkpoint engine above (replacing whatever a user DeepSpeed JSON chose); idempotent."""
    if getattr(engine.checkpoint_engine, "prefetched", None) is not None:
        return
    trainable, buffers = module_names(engine.module)
    engine.checkpoint_engine = _checkpoint_engine_class()(getattr(engine, "_config", None), keep=trainable | buffers)


def _verify_files(directory: Path) -> None:
    """The files the manifest lists exist with the sizes written (checkpoints written before manifests pass)."""
    path = directory / MANIFEST
    if not path.is_file():
        return
    try:
        files = json.loads(path.read_text())["files"]
        sizes = {str(k): int(v) for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise Unloadable(f"{MANIFEST} does not parse: {exc}") from None
    for name, size in sizes.items():
        target = directory / name
        if not target.is_file():
            raise Unloadable(f"{name} is missing")
        if target.stat().st_size != size:
            raise Unloadable(f"{name} has {target.stat().st_size} bytes, {size} were written")


def _own_files(directory: Path) -> list[Path]:
    """The state files this rank loads: the shared model states (ZeRO 0-2) and its own ZeRO partition files."""
    rank = _rank()
    state = directory / "ds" / "state"
    if not state.is_dir():
        raise Unloadable("ds/state is missing")
    return sorted(p for p in state.glob("*.pt")
                  if re.fullmatch(r"mp_rank_\d+_model_states\.pt", p.name) or f"zero_pp_rank_{rank}_mp_rank_" in p.name)


def _agree(problem: str | None) -> str | None:
    """The first rank's problem, on every rank (so all ranks fall back together), or None."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return problem
    problems: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    return next((p if i == 0 else f"rank {i}: {p}" for i, p in enumerate(problems) if p), None)


def _check_fit(engine, model_states: Any, directory: Path) -> None:
    """The saved module state holds this run's trainable parameters, and nothing but them and buffers. Frozen
    weights a checkpoint holds anyway (written before checkpoints left them out) are dropped: they come from the
    verified build, never from a checkpoint."""
    module = model_states.get("module") if isinstance(model_states, dict) else None
    module = module if isinstance(module, dict) else {}
    trainable, buffers = module_names(engine.module)
    frozen = {n for n, p in engine.module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    for name in [n for n in module if n in frozen]:
        del module[name]
    missing, extra = sorted(trainable - set(module)), sorted(set(module) - trainable - buffers)
    if missing or extra:
        raise MMError(f"checkpoint {directory} was written for another model or trainable set: {len(missing)} of this "
                      f"run's trainable parameters missing (e.g. {missing[:2]}), {len(extra)} unknown ones saved (e.g. "
                      f"{extra[:2]}); start a new run (another output_dir)")


def load_checkpoint(engine, directory: Path) -> dict:
    """Restore the engine's trainable parameters, optimizer and scheduler from ``directory``; returns the saved
    trainer state. Raises Unloadable (on every rank) when a file does not load, before any state is applied;
    MMError when the state does not fit this run."""
    use_safe_checkpoints(engine)
    problem = None
    try:
        _verify_files(directory)
        files = _own_files(directory)
        engine.checkpoint_engine.prefetch(files)
    except Unloadable as exc:
        problem = str(exc)
    problem = _agree(problem)
    if problem is not None:
        raise Unloadable(problem)
    prefetched = engine.checkpoint_engine.prefetched
    model_states = next((prefetched[os.path.realpath(p)] for p in files if p.name.endswith("model_states.pt")), None)
    if model_states is not None:
        _check_fit(engine, model_states, directory)
    try:
        path, client = engine.load_checkpoint(str(directory / "ds"), tag="state", load_optimizer_states=True,
                                              load_lr_scheduler_states=True, load_module_strict=False)
    except (Unloadable, MMError):
        raise
    except Exception as exc:  # DeepSpeed's own checks: world size, partition shapes
        raise MMError(f"checkpoint {directory} does not fit this run: {type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    finally:
        engine.checkpoint_engine.prefetched = {}
    if path is None or "trainer" not in (client or {}):
        raise Unloadable("DeepSpeed found no state in ds/state")
    return client["trainer"]


def clean_partial(run: Path) -> None:
    """Remove leftovers of interrupted saves (rank 0)."""
    for root in (run / "checkpoints", run):
        if root.is_dir():
            for child in root.iterdir():
                if child.name.startswith(".tmp-"):
                    shutil.rmtree(child, ignore_errors=True)
