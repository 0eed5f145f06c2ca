"""Run every benchmark of the project in one process; print one JSON object of figures; write the Markdown table.

    python tools/bench.py [--quick] [--device cpu|cuda] [--modules bench_generate,...] [--markdown BENCHMARKS.md]

Each ``tools/bench_<topic>.py`` has ``run(quick=False[, device=...]) -> dict``; a module that is missing or fails is
skipped with its reason recorded. Headline figures are picked from the modules' results (see FIGURES) and each
carries the machine it came from. With ``--device cuda`` the modules that take a ``device`` run on the GPU and
``tools/bench_train_gpu.py`` adds the training-step MFU of a ~0.5B-parameter configuration (``gpu_mfu``); never
used by tests.
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

MODULES = ["bench_generate", "bench_train", "bench_loader", "bench_moe", "bench_serve"]  # listed, not discovered

# figure -> (goal, candidate "module:dotted.path" sources; the first present wins)
FIGURES = {
    "generate_speedup": (">= 1.5", ["bench_generate:generate_speedup"]),
    "first_token_speedup": (">= 1.2", ["bench_generate:first_token_speedup"]),
    "train_speedup": (">= 1.3", ["bench_train:train_speedup"]),
    "packing_efficiency": (">= 0.95", ["bench_loader:packing_efficiency", "bench_loader:packed_efficiency"]),
    "loader_headroom": (">= 2", ["bench_loader:loader_headroom", "bench_train:loader_headroom"]),
    "moe_overhead": ("<= 1.15", ["bench_moe:moe_overhead", "bench_moe:forward.experts_vs_plain"]),
    "mfu": (">= 0.75", ["bench_train:mfu"]),
    "decode_bandwidth_fraction": ("", ["bench_generate:decode_bandwidth_fraction"]),
    "gpu_mfu": ("", ["bench_train_gpu:mfu"]),  # --device cuda only: ~0.5B training step, bf16
}
# loader_headroom when no module reports it: loader samples/s over the training step's samples/s
LOADER_RATE = ["bench_loader:loader_samples_per_s"]
TRAIN_RATE = ["bench_train:train_samples_per_s", "bench_train:samples_per_s"]


def machine() -> dict:
    import torch

    info = {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or
            platform.machine(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def lookup(results: dict, source: str):
    module, _, path = source.partition(":")
    value = results.get(module)
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def first(results: dict, sources: list[str]):
    for source in sources:
        value = lookup(results, source)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value, source
    return None, None


def run_module(name: str, quick: bool, device: str) -> tuple[dict | None, str | None, float]:
    start = time.perf_counter()
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            return None, f"tools/{name}.py does not exist yet", 0.0
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
    if device.startswith("cuda") and "bench_train_gpu" not in modules:
        modules = modules + ["bench_train_gpu"]  # the ~0.5B training-step MFU: GPU runs only
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
    for figure, (goal, sources) in FIGURES.items():
        value, source = first(results, sources)
        if value is None and figure == "loader_headroom":
            loader, loader_src = first(results, LOADER_RATE)
            train, train_src = first(results, TRAIN_RATE)
            if loader is not None and train:
                value, source = loader / train, f"{loader_src} / {train_src}"
        module = source.partition(":")[0] if source else None
        figure_machine = results.get(module, {}).get("machine", host) if module in results else host
        report[figure] = {"value": value, "goal": goal, "source": source, "machine": figure_machine}
        if value is None:
            reasons = {}
            for s in sources:
                name = s.partition(":")[0]
                reasons[name] = skipped.get(name, "no such key" if name in results else "not run")
            report[figure]["reason"] = "; ".join(f"{name}: {why}" for name, why in reasons.items())
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
        f"Regenerated by `python tools/bench.py --markdown BENCHMARKS.md{' --quick' if report['quick'] else ''}"
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
                     f"{row['source'] or row.get('reason', '')} | {where.get('cores')} cores, "
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and tokens (a smoke run)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--modules", default=",".join(MODULES), help="comma-separated bench_* modules to run")
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
