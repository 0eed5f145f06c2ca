"""Run every benchmark of the project in one process; print one JSON object of figures; write the Markdown table.

    python -m tools.bench [--quick] [--device cpu|cuda] [--modules generate,train,...] [--markdown BENCHMARKS.md]

Each module ``tools.bench.<topic>`` has ``run(quick=False[, device=...]) -> dict``; a module that is missing or
fails is skipped with its reason recorded. Headline figures are picked from the modules' results (see FIGURES)
and each carries the machine it came from. With ``--device cuda`` the modules that take a ``device`` run on the
GPU, ``tools.bench.train_gpu`` adds the training-step MFU of a ~0.5B-parameter configuration (``gpu_mfu``) and
``tools.bench.train_mm`` the same through ``mm.train`` itself (``gpu_train_mfu``);
never used by tests.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform
import sys
import time
import traceback

PACKAGE = "tools.bench"
MODULES = ["generate", "train", "loader", "moe", "serve", "checkpoint", "packing", "cli"]  # listed, not discovered

# figure -> (goal, source): "module:dotted.key" of a module's result, or "a / b", the ratio of two such keys.
# Each key is one its module emits (tests/evaluate/test_bench_runner.py checks the modules' source).
FIGURES = {
    "generate_speedup": (">= 1.5", "generate:generate_speedup"),
    "first_token_speedup": (">= 1.5", "generate:first_token_speedup"),  # raised from 1.2 (scale issue)
    "train_speedup": (">= 2.0", "train:train_speedup"),  # raised from 1.3 (scale issue)
    "packing_efficiency": (">= 0.95", "loader:packed_efficiency"),
    # the loader's samples/s over the training step's: how many steps' worth of data one loader process makes
    "loader_headroom": (">= 2", "loader:loader_samples_per_s / train:train_samples_per_s"),
    "moe_overhead": ("<= 1.15", "moe:forward.experts_vs_plain"),
    "mfu": (">= 0.75", "train:mfu"),
    "decode_bandwidth_fraction": ("", "generate:decode_bandwidth_fraction"),
    "gpu_mfu": ("", "train_gpu:mfu"),  # --device cuda only: ~0.5B training step, bf16
    "gpu_train_mfu": (">= 0.45", "train_mm:gpu_train_mfu"),  # --device cuda only: mm.train, 0.5B + ViT-L/14-336,
    # bf16, ZeRO-2, packed 8k rows
    "checkpoint_overhead": ("<= 1.1", "checkpoint:checkpoint_overhead"),  # bytes per checkpoint / trainable state
    "grad_ckpt_memory_ratio": ("<= 0.6", "grad_ckpt:grad_ckpt_memory_ratio"),  # 4,096-token step peak, with / without
    "long_packed_step_ratio": ("<= 1.0", "packing:long_packed_step_ratio"),  # 8,192-token step, 8 docs / causal
    "packed_mask_memory_ratio": ("<= 1.05", "packing:packed_mask_memory_ratio"),  # that step's peak / causal
    "cli_help_s": ("<= 1.5", "cli:help_s"),  # `mm --help` in a fresh process, median seconds
}


def machine() -> dict:
    import torch

    info = {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or
            platform.machine(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def lookup(results: dict, key: str):
    """The number at ``module:dotted.key`` of ``results``, or None."""
    module, _, path = key.partition(":")
    value = results.get(module)
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def value_of(results: dict, source: str):
    """A figure's value: one key, or the ratio ``a / b`` of two keys; None when a key is missing."""
    values = [lookup(results, key.strip()) for key in source.split(" / ")]
    if any(v is None for v in values) or (len(values) == 2 and not values[1]):
        return None
    return values[0] if len(values) == 1 else values[0] / values[1]


def source_modules(source: str) -> list[str]:
    return [key.strip().partition(":")[0] for key in source.split(" / ")]


def run_module(name: str, quick: bool, device: str) -> tuple[dict | None, str | None, float]:
    start = time.perf_counter()
    try:
        module = importlib.import_module(f"{PACKAGE}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"{PACKAGE}.{name}":
            return None, f"{PACKAGE}.{name} does not exist", 0.0
        return None, f"import failed: {exc}", 0.0
    kwargs = {"quick": quick}
    if "device" in inspect.signature(module.run).parameters:
        kwargs["device"] = device
    elif device != "cpu":
        return None, f"{name}.run has no device parameter (CPU only)", 0.0
    import torch

    grad_mode, threads = torch.is_grad_enabled(), torch.get_num_threads()
    try:
        result = module.run(**kwargs)
    except Exception as exc:  # one failing benchmark must not lose the others' figures
        traceback.print_exc(file=sys.stderr)
        return None, f"failed: {type(exc).__name__}: {exc}", time.perf_counter() - start
    finally:  # global torch state one module sets must not leak into the next
        torch.set_grad_enabled(grad_mode)
        torch.set_num_threads(threads)
    return result, None, time.perf_counter() - start


def collect(quick: bool, device: str, modules: list[str]) -> dict:
    results, skipped, seconds = {}, {}, {}
    if device.startswith("cuda"):  # GPU-only figures: the bare ~0.5B step and the same through mm.train
        modules = modules + [m for m in ("train_gpu", "train_mm") if m not in modules]
    for name in modules:
        result, reason, took = run_module(name, quick, device)
        seconds[name] = round(took, 1)
        if result is None:
            skipped[name] = reason
            print(f"bench: skip {name}: {reason}", file=sys.stderr)
        else:
            results[name] = result
            # each module's figures as soon as it ends: a run cut short still leaves them in the log
            print(f"bench: {name} done in {took:.0f} s: {json.dumps(result, default=str)}", file=sys.stderr)
    host = machine()
    report = {"device": device, "quick": quick, "machine": host}
    for figure, (goal, source) in FIGURES.items():
        value = value_of(results, source)
        ran = [m for m in source_modules(source) if m in results]
        figure_machine = results[ran[0]].get("machine", host) if ran else host
        report[figure] = {"value": value, "goal": goal, "source": source, "machine": figure_machine}
        if value is None:
            reasons = {m: skipped.get(m, "no such key" if m in results else "not run") for m in source_modules(source)}
            report[figure]["reason"] = "; ".join(f"{m}: {why}" for m, why in reasons.items())
    report["results"] = results
    report["skipped"] = skipped
    report["seconds"] = seconds
    return report


def met(value, goal: str) -> str:
    if value is None or not goal:
        return ""
    op, _, bound = goal.partition(" ")
    return "yes" if (value >= float(bound) if op == ">=" else value <= float(bound)) else "no"


def markdown(report: dict) -> str:
    host = report["machine"]
    lines = [
        "# Benchmarks",
        "",
        f"Regenerated by `python -m tools.bench --markdown BENCHMARKS.md{' --quick' if report['quick'] else ''}"
        f"{' --device ' + report['device'] if report['device'] != 'cpu' else ''}`. Every ratio comes from this one "
        "run, ours and the peer interleaved in the same process; noisy figures are medians of repeats.",
        "",
        f"Machine: {host['cores']} cores, {host['torch_threads']} torch threads, {host.get('cpu', '')}"
        f"{', ' + host['gpu'] if 'gpu' in host else ''}, torch {host['torch']}; device `{report['device']}`.",
        "",
        "| figure | value | goal | met | source | machine |",
        "|---|---|---|---|---|---|",
    ]
    for figure in FIGURES:
        row = report[figure]
        value = "n/a" if row["value"] is None else f"{row['value']:.3f}"
        where = row["machine"]
        lines.append(f"| {figure} | {value} | {row['goal']} | {met(row['value'], row['goal'])} | "
                     f"{row['source'] if row['value'] is not None else row['reason']} | {where.get('cores')} cores, "
                     f"{where.get('torch_threads')} threads |")
    lines += ["", "## Details", ""]
    for name, result in report["results"].items():
        lines += [f"### {name} ({report['seconds'].get(name, '')} s)", "", "```json",
                  json.dumps(result, indent=2, default=str), "```", ""]
    if report["skipped"]:
        lines += ["## Skipped", ""] + [f"- {name}: {reason}" for name, reason in report["skipped"].items()] + [""]
    return "\n".join(lines)


KEEP_MARKER = "<!-- kept on regeneration: figures from other commands below -->"


def kept_section(path: str) -> str:
    """The part of an existing file from KEEP_MARKER on (figures other tools produce, each with its command)."""
    try:
        text = open(path).read()
    except OSError:
        return ""
    at = text.find(KEEP_MARKER)
    return "" if at < 0 else "\n" + text[at:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and tokens (a smoke run)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--modules", default=",".join(MODULES), help="comma-separated modules of tools.bench to run")
    parser.add_argument("--markdown", default=None, metavar="FILE", help="write the Markdown table to FILE")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("bench: error: --device cuda but no CUDA device is available", file=sys.stderr)
            return 2
    report = collect(args.quick, args.device, [m.strip() for m in args.modules.split(",") if m.strip()])
    print(json.dumps(report, indent=2, default=str))
    if args.markdown:
        with open(args.markdown + ".tmp", "w") as handle:
            handle.write(markdown(report) + kept_section(args.markdown))
        os.replace(args.markdown + ".tmp", args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
