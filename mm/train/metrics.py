"""Where a run's numbers go: ``RUN/metrics.jsonl`` always, plus the trackers of ``trainer.report_to``.

``tensorboard`` writes ``RUN/tb/`` (tags ``train/<key>`` and, for keys that already name a group such as
``eval/loss``, the key itself). ``wandb`` and ``mlflow`` are optional extras (``pip install 'mm-vlm[wandb]'``,
``'mm-vlm[mlflow]'``) and work without a network: wandb runs offline (``WANDB_MODE``, default ``offline``) into
``RUN/wandb/``; mlflow logs to a local file store ``RUN/mlruns`` unless ``MLFLOW_TRACKING_URI`` names another.
Only rank 0 reports. On resume, JSON lines after the resumed step are dropped and the trackers continue the
same run.
"""
from __future__ import annotations

import importlib.util
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterable

import torch

from mm.errors import MMError

TRACKERS = ("tensorboard", "wandb", "mlflow")
EXTRAS = {"wandb": "wandb", "mlflow": "mlflow"}  # tracker -> the module it imports and the mm extra that installs it


def check_trackers(names: Iterable[str]) -> None:
    """MMError (one line naming the extra to install) when a tracker's package is missing; call before building."""
    for name in names:
        if name not in TRACKERS:
            raise MMError(f"trainer.report_to: unknown tracker {name!r}; choose from: {', '.join(TRACKERS)}")
        module = EXTRAS.get(name)
        if module and importlib.util.find_spec(module) is None:
            from mm.cli import DISTRIBUTION

            raise MMError(f"trainer.report_to names {name}, which is not installed: pip install "
                          f"'{DISTRIBUTION}[{name}]' (or drop {name} from trainer.report_to)")


def grad_norm(parameters: Iterable[torch.nn.Parameter]) -> float | None:
    """The 2-norm of the gradients of ``parameters`` (None when none holds a gradient, e.g. under ZeRO-2,
    where gradients live in the optimizer's partitions)."""
    norms = [p.grad.detach().float().norm(2) for p in parameters if p.grad is not None]
    if not norms:
        return None
    return float(torch.stack(norms).norm(2))


def tag(key: str) -> str:
    """Tracker name of a metric: ``loss`` -> ``train/loss``; ``eval/loss`` stays."""
    return key if "/" in key else f"train/{key}"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


class TensorBoard:
    def __init__(self, run: Path, start_step: int, params: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run / "tb"), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(tag(key), value, step)

    def close(self) -> None:
        self.writer.close()


def _run_id(run: Path, tracker: str) -> str | None:
    path = run / f".{tracker}-run-id"
    return path.read_text().strip() if path.is_file() else None


class WandB:
    def __init__(self, run: Path, start_step: int, params: dict):
        import wandb

        run_id = _run_id(run, "wandb") or uuid.uuid4().hex[:12]
        (run / ".wandb-run-id").write_text(run_id)
        mode = os.environ.get("WANDB_MODE", "offline")  # no network, no login; `wandb sync RUN/wandb/...` later
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mm"), name=run.name, id=run_id, mode=mode,
                              resume="allow", dir=str(run), config=params)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log({tag(k): v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, run: Path, start_step: int, params: dict):
        if not os.environ.get("MLFLOW_TRACKING_URI"):  # a local file store under the run (mlflow 3 asks for the opt-in)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri((run / "mlruns").resolve().as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "mm"))
        run_id = _run_id(run, "mlflow")
        active = mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(run_name=run.name)
        self.run_id = active.info.run_id
        (run / ".mlflow-run-id").write_text(self.run_id)
        if not run_id:
            flat = {k: str(v)[:500] for k, v in _flatten(params).items()}
            items = list(flat.items())
            for i in range(0, len(items), 100):
                mlflow.log_params(dict(items[i:i + 100]))

    def log(self, step: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics({tag(k): float(v) for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


OPENERS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


class Metrics:
    """JSON lines + the ``report_to`` trackers of a run dir (rank 0; other ranks get a no-op)."""

    def __init__(self, run: Path, start_step: int, enabled: bool, report_to: Iterable[str] = ("tensorboard",),
                 params: dict | None = None):
        self.enabled = enabled
        self.path = run / "metrics.jsonl"
        self.trackers: list[Any] = []
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
        check_trackers(report_to)
        for name in dict.fromkeys(report_to):
            self.trackers.append(OPENERS[name](run, start_step, params or {}))

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        for tracker in self.trackers:
            tracker.log(step, values)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
