"""Fail fast: everything a run needs that can be checked without its weights, checked before any is loaded.

``preflight(config)`` runs first in ``mm.train.loop.train``: before DeepSpeed is imported or initialised, before
an op is built, before a weight is read. A typo costs seconds, not the minutes a large model takes to load:

- ``output_dir`` is a directory this process can write (created, a probe file written and removed);
- every shard source (``data.train``, ``data.val``, ``trainer.eval_tasks[].data``) finds shards;
- ``init_from`` is an mm model or finished run directory, its ``mm_config.json`` readable;
- ``trainer.deepspeed_config`` is a readable JSON object;
- every ``stage.trainable`` glob matches a parameter name of the model, built on the meta device (no memory,
  no weights): ``init_from``'s saved architecture, or the encoder (``pretrained=False``; an encoder that cannot
  build on meta, open_clip, on the CPU without weights) and the LLM family's builder (``load_local`` builds from
  ``config.json`` on meta), with modality experts and LoRA as the run adds them. An LLM family whose builder
  cannot run on meta is skipped here; its globs are then checked by ``apply_stage`` right after the real build,
  still before ``deepspeed.initialize``.

Config types, registry names and each loss's own requirements were checked when the config loaded
(``mm.schema``, ``mm.train.config.validate``).
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from mm.errors import MMError
from mm.train.config import TrainConfig


def preflight(config: TrainConfig, need_data: bool = True) -> None:
    """Raise MMError (one line) on the first problem found; ``need_data=False`` when batches are handed to
    ``train`` (no shard sources then)."""
    writable_dir(config.output_dir, "output_dir")
    if need_data:
        for key, sources in (("data.train", config.data.train), ("data.val", config.data.val)):
            shard_sources(key, sources)
    for i, task in enumerate(config.trainer.eval_tasks):
        shard_sources(f"trainer.eval_tasks[{i}].data", task.data)
    if config.init_from:
        from mm.checkpoint import read_config
        from mm.loading import resolve_model_dir

        read_config(resolve_model_dir(config.init_from))
    if config.trainer.deepspeed_config:
        deepspeed_json(Path(config.trainer.deepspeed_config))
    trainable_globs(config)


def writable_dir(path: str | Path, what: str, keep: bool = True) -> Path:
    """Create ``path`` if needed and prove it writable with a probe file (removed); MMError naming ``what``.
    ``keep=False`` removes again the directories it created (a command that may still refuse leaves nothing)."""
    path = Path(path)
    created = [p for p in [path, *path.parents] if not p.exists()]
    probe = path / f".mm-write-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise MMError(f"{what} {str(path)!r} is not a writable directory ({reason})") from None
    finally:
        if not keep:
            for directory in created:  # deepest first
                try:
                    directory.rmdir()
                except OSError:
                    break
    return path


def writable_file(path: str | Path, what: str, keep: bool = True) -> Path:
    """``path`` is a file that can be written: not a directory, in a writable directory (created if needed)."""
    path = Path(path)
    if path.is_dir():
        raise MMError(f"{what} {str(path)!r} is a directory; give a file name")
    writable_dir(path.parent, f"the directory of {what}", keep)
    return path


def shard_sources(key: str, sources) -> None:
    """Each shard source (a directory, glob, brace pattern or file; or a list of them) finds at least one shard."""
    from mm.data import list_shards

    for source in sources if isinstance(sources, list) else [sources] if sources else []:
        try:
            list_shards(source)
        except MMError as exc:
            raise MMError(f"{key}: {exc}") from None


def deepspeed_json(path: Path) -> None:
    if not path.is_file():
        raise MMError(f"trainer.deepspeed_config file not found: {path}")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise MMError(f"trainer.deepspeed_config {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MMError(f"trainer.deepspeed_config {path} must hold a JSON object")


def trainable_globs(config: TrainConfig) -> bool:
    """Check ``stage.trainable`` against the names of the run's model built on the meta device. Returns False
    when a part cannot be built on meta (the check then happens after the real build)."""
    from mm.train.stage import apply_stage, parse_trainable

    groups = parse_trainable(config.stage.trainable, config.trainer.lr)  # lr types and signs, no model needed
    model = meta_model(config)
    if model is None:
        return False
    apply_stage(model, groups)
    return True


def meta_model(config: TrainConfig):
    """The run's student as ``build_student`` + ``apply_lora`` make it, on the meta device (an encoder that cannot
    build there: on the CPU, without weights; ``mm.loading.encoder_skeleton``). None when the LLM's builder cannot
    run on meta. MMErrors of the builders (a missing encoder or LLM directory) propagate."""
    import torch

    from mm.compose import assemble, build_llm
    from mm.loading import encoder_skeleton
    from mm.train.build import apply_lora, continue_from

    try:
        if config.init_from:
            from mm.checkpoint import read_config
            from mm.llm.base import load_tokenizer
            from mm.loading import resolve_model_dir, skeleton

            directory = resolve_model_dir(config.init_from)
            model = skeleton(read_config(directory), directory, load_tokenizer(directory / "tokenizer"), meta=True)
            with torch.device("meta"):
                continue_from(model, config)
        else:
            encoder = encoder_skeleton(config.model)
            with torch.device("meta"):
                llm, tokenizer = build_llm(config.model)
                model = assemble(config.model, encoder, llm, tokenizer)
        with torch.device("meta"):
            apply_lora(model, config)
    except MMError:
        raise
    except Exception:  # an LLM builder that needs real tensors: apply_stage checks the globs after the real build
        return None
    return model
