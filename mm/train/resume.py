"""Resuming a run: the config check, the reference to the frozen weights, and loading the newest checkpoint
that loads.

``train()`` uses it in three steps::

    resume = Resume(config, run, allow_config_change)   # before any model is built: refuses a changed config
    resume.record_base(model, loss)                     # before DeepSpeed: digests the frozen weights
    start_step = resume.load(engine)                    # after DeepSpeed: newest complete checkpoint that loads

**Config.** Each checkpoint holds the resolved config it was written under (``config.yaml``). Every dotted key
of the new config is compared with it; a change to anything but ``HARMLESS`` keys (the model, the trainable
set, the data, lr, batch size, accumulation, seeds, ...) is refused with one line naming each changed key,
unless the caller accepts it (``--allow-config-change``).

**Frozen weights** are not in checkpoints: they come back from the same build (``init_from`` or the model
config through the registries). ``base.json`` records where from, and a digest of every frozen tensor of the
student and of the loss's frozen models. The digest hashes each tensor's name, shape and dtype and 1024
elements at evenly spaced positions (first and last included): it runs on the tensors the run really trains
against (pretrained downloads, seeded random parts, experts copied from an FFN, a LoRA base), reads no file,
and costs milliseconds for a 7B model (~300 tensors x 1024 elements) where hashing 14 GB would take minutes.
Any other base (another fine-tune, another revision, another seed or architecture) differs at nearly every
element, so a sample of 1024 per tensor catches it; a sparse edit of a few weights would not be caught.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from mm.errors import MMError
from mm.train import checkpoints

# Keys that may change between a run and its resumption: where the run lives, how long it goes on, how often it
# saves, logs and evaluates. They change neither the model, the trainable set, the training data, nor the
# optimisation of the steps already taken (max_steps stretches the cosine tail from here on).
HARMLESS = ("output_dir", "trainer.max_steps", "trainer.save_every", "trainer.log_every", "trainer.keep_last",
            "trainer.eval_every", "trainer.eval_batches", "trainer.eval_tasks", "trainer.report_to", "data.val")
SAMPLES = 1024  # elements hashed per frozen tensor
BASE_FILE = "base.json"


def _warn(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"mm: warning: {message}", file=sys.stderr, flush=True)


# ---- the config check ---------------------------------------------------------------------------------------

def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of nested mappings; lists and scalars are leaves (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
    if not isinstance(data, dict) or (prefix and not data):
        return {prefix[:-1]: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def config_changes(saved: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, new value)`` of every dotted key that differs, harmless keys left out."""
    old, now = flatten(saved), flatten(new)
    missing = object()
    changes = []
    for key in sorted(set(old) | set(now)):
        if key in HARMLESS:
            continue
        a, b = old.get(key, missing), now.get(key, missing)
        if a != b:
            changes.append((key, None if a is missing else a, None if b is missing else b))
    return changes


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def saved_config(run: Path) -> dict | None:
    """The resolved config the newest complete checkpoint was written under (its ``config.yaml``, else the
    run's), normalised through the schema so defaults added since compare equal; None without a checkpoint."""
    from mm.config import from_dict, to_dict
    from mm.train.config import TrainConfig

    newest = checkpoints.latest(run)
    if newest is None:
        return None
    for path in (newest[1] / "config.yaml", run / "config.yaml"):
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text())
            except yaml.YAMLError:
                continue
            if isinstance(data, dict):
                try:
                    return to_dict(from_dict(TrainConfig, data))
                except MMError:  # a schema that no longer loads: compare what was written
                    return data
    raise MMError(f"{newest[1]} has no readable config.yaml (nor has {run}); cannot check the config of the resumed "
                  f"run: start a new run (another output_dir)")


def check_config(config, run: Path, allow_change: bool) -> None:
    """Refuse (MMError, one line) to resume ``run`` under a config that changes more than ``HARMLESS`` keys."""
    from mm.config import to_dict

    saved = saved_config(run)
    if saved is None:
        return
    changes = config_changes(saved, to_dict(config))
    if not changes:
        return
    listed = ", ".join(f"{key}: {_short(a)} -> {_short(b)}" for key, a, b in changes)
    if allow_change:
        _warn(f"resuming {run} with a changed config (--allow-config-change): {listed}")
        return
    raise MMError(f"{run} was trained with another config ({listed}); resume it with the same config, start a new run "
                  f"(another output_dir), or accept the change with --allow-config-change")


# ---- the frozen weights -------------------------------------------------------------------------------------

def frozen_digest(module: torch.nn.Module, only_frozen: bool = True) -> dict[str, Any]:
    """Digest of every frozen parameter of ``module`` (every parameter, with ``only_frozen=False``): name, shape,
    dtype and ``SAMPLES`` evenly spaced elements of each."""
    h = hashlib.sha256()
    tensors = elements = 0
    for name, p in module.named_parameters():
        if only_frozen and p.requires_grad:
            continue
        flat = p.detach().reshape(-1)
        n = flat.numel()
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}\n".encode())
        if n:
            k = min(n, SAMPLES)
            positions = torch.arange(k, dtype=torch.int64) * (n - 1) // max(k - 1, 1)
            sample = flat[positions.to(flat.device)].cpu().contiguous()
            h.update(sample.view(torch.uint8).numpy().tobytes())
        tensors += 1
        elements += n
    return {"sha256": h.hexdigest(), "tensors": tensors, "elements": elements}


def base_reference(config, model, loss=None) -> dict[str, Any]:
    """What rebuilds the frozen weights (``init_from`` or the model config) and their digests."""
    from mm.config import to_dict
    from mm.loading import resolve_model_dir

    if config.init_from:
        source = {"init_from": str(resolve_model_dir(config.init_from).resolve())}
    else:
        source = {"model": to_dict(config.model), "seed": config.trainer.seed}
    frozen = {"student": frozen_digest(model)}
    for name, frozen_model in (loss.frozen_models().items() if loss is not None else ()):
        frozen[name] = frozen_digest(frozen_model, only_frozen=False)
    return {**source, "frozen": frozen}


def base_problem(saved: dict, live: dict) -> str | None:
    """Why the frozen weights of ``live`` are not those ``saved`` was trained against, or None."""
    differ = sorted(name for name in set(saved.get("frozen", {})) | set(live["frozen"])
                    if saved.get("frozen", {}).get(name) != live["frozen"].get(name))
    if not differ:
        return None
    where = saved.get("init_from") or "the model config"
    return f"the frozen weights ({', '.join(differ)}) differ from those it was trained against (built from {where})"


def read_base(directory: Path) -> dict | None:
    path = directory / BASE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise checkpoints.Unloadable(f"{BASE_FILE} does not parse: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("frozen"), dict):
        raise checkpoints.Unloadable(f"{BASE_FILE} has no 'frozen' digests")
    return data


# ---- resuming -----------------------------------------------------------------------------------------------

class Resume:
    """The resumption of one run: the config check at construction, then ``record_base`` and ``load``."""

    def __init__(self, config, run: Path, allow_config_change: bool = False):
        self.config, self.run, self.allow = config, Path(run), allow_config_change
        check_config(config, self.run, allow_config_change)
        self.base: dict | None = None
        self.checked: set[Path] = set()  # checkpoints whose base was checked (each warns once)

    def _check_base(self, directory: Path) -> None:
        if directory in self.checked:
            return
        saved = read_base(directory)
        self.checked.add(directory)
        if saved is None:
            _warn(f"{directory} records no frozen-weight digest ({BASE_FILE}); the frozen weights are not verified")
            return
        problem = base_problem(saved, self.base)
        if problem is None:
            return
        if self.allow:
            _warn(f"resuming {directory}: {problem} (--allow-config-change)")
            return
        raise MMError(f"cannot resume {directory}: {problem}; restore that base, start a new run (another output_dir), "
                      f"or accept the change with --allow-config-change")

    def record_base(self, model, loss=None) -> dict:
        """Digest the frozen weights (before DeepSpeed partitions them), refuse a base that differs from the newest
        checkpoint's, and write ``RUN/base.json`` (rank 0), which every checkpoint then copies."""
        self.base = base_reference(self.config, model, loss)
        newest = checkpoints.latest(self.run)
        if newest is not None:
            try:
                self._check_base(newest[1])
            except checkpoints.Unloadable:
                pass  # load() falls back past it
        if not dist.is_initialized() or dist.get_rank() == 0:
            self.run.mkdir(parents=True, exist_ok=True)
            tmp = self.run / f".{BASE_FILE}.tmp"
            tmp.write_text(json.dumps(self.base, indent=2) + "\n")
            tmp.replace(self.run / BASE_FILE)
        return self.base

    def load(self, engine) -> int:
        """Restore the newest complete checkpoint that loads (warning about, and passing over, those that do not);
        returns its step, or 0 for a fresh run. Every resume file is unpickled with ``weights_only=True``."""
        checkpoints.use_safe_checkpoints(engine)
        fresh = optimizer_hyperparameters(engine)  # this run's, before a load brings back the saved ones
        failures = []
        for _, directory in reversed(checkpoints.complete_checkpoints(self.run)):
            try:
                if self.base is not None:
                    self._check_base(directory)
                state = checkpoints.load_checkpoint(engine, directory)
            except checkpoints.Unloadable as exc:
                failures.append(f"{directory.name}: {exc}")
                _warn(f"checkpoint {directory} does not load ({exc}); falling back to the previous one")
                continue
            restore_hyperparameters(engine, fresh)
            if not dist.is_initialized() or dist.get_rank() == 0:
                print(f"resuming from {directory} (step {state['step']})", flush=True)
            return int(state["step"])
        if failures:
            raise MMError(f"no checkpoint of {self.run} loads ({'; '.join(failures)}); move {self.run / 'checkpoints'} "
                          f"aside to start the run over")
        return 0


def optimizer_hyperparameters(engine) -> tuple[list[dict], list[float] | None]:
    """The engine's optimizer hyperparameters (per group, without the parameters) and the scheduler's base lrs."""
    scheduler = engine.lr_scheduler
    groups = scheduler.optimizer.param_groups if scheduler is not None else engine.optimizer.param_groups
    hyper = [{k: v for k, v in group.items() if k != "params"} for group in groups]
    return hyper, list(scheduler.base_lrs) if hasattr(scheduler, "base_lrs") else None


def restore_hyperparameters(engine, fresh: tuple[list[dict], list[float] | None]) -> None:
    """After a load: the hyperparameters of this run's config (a loaded optimizer brings back those it was saved
    with), and each group's lr recomputed from the schedule at the restored position."""
    hyper, base_lrs = fresh
    scheduler = engine.lr_scheduler
    groups = scheduler.optimizer.param_groups if scheduler is not None else engine.optimizer.param_groups
    if len(groups) != len(hyper):
        raise MMError(f"the checkpoint has {len(groups)} optimizer groups, this run {len(hyper)}")
    for group, values in zip(groups, hyper):
        group.update({k: v for k, v in values.items() if k != "lr"})
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) and base_lrs is not None:
        scheduler.base_lrs = base_lrs
        for group, base, factor in zip(groups, base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in groups]
