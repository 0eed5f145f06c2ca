"""``mm plot``: draw a run's curves from RUN/metrics.jsonl to a PNG, one panel per metric, one line per run.

    mm plot RUN [RUN2 ...] [--out curves.png] [--keys loss,lm,lr]

By default: the loss, then each loss term (each with its held-out ``eval/<term>`` dashed on the same panel), other
eval metrics (``eval/vqa/accuracy``), then grad_norm, lr and tokens/s. ``--keys`` draws exactly those panels
(``loss`` still carries ``eval/loss``; ``eval/loss`` alone is its own panel).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mm.errors import MMError

SYSTEM = ("grad_norm", "lr", "tokens_per_s")  # drawn after the loss terms, each once
NOT_CURVES = {"step", "epoch"}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("plot", help="draw training curves from RUN/metrics.jsonl", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="PNG path (default RUN/metrics.png of the first run)")
    parser.add_argument("--keys", help="comma-separated panels to draw (default: every loss term, grad_norm, lr, "
                                       "tokens_per_s)")
    parser.set_defaults(run=run)


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise MMError(f"{path} not found (is {run} a training run directory?)")
    rows = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise MMError(f"{path}:{number}: not a JSON line: {exc}") from None
        if not isinstance(row, dict) or not _number(row.get("step")):
            raise MMError(f"{path}:{number}: not a metrics row (a JSON object with a numeric step)")
        rows.append({key: value for key, value in row.items() if _number(value)})  # numbers only are drawn
    return rows


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def panels(runs: list[list[dict]], keys: list[str] | None = None) -> list[tuple[str, list[str]]]:
    """``[(panel, [metric, ...])]``: each panel once; a train term's panel also carries ``eval/<term>``."""
    logged = {k for rows in runs for row in rows for k in row if k not in NOT_CURVES}
    if keys is None:
        terms = sorted((k for k in logged if "/" not in k and k not in SYSTEM), key=lambda k: (k != "loss", k))
        paired = {f"eval/{k}" for k in terms}
        keys = terms + sorted(k for k in logged if "/" in k and k not in paired) + [k for k in SYSTEM if k in logged]
    out = []
    for key in dict.fromkeys(keys):
        if key not in logged:
            raise MMError(f"no metric {key!r} in the runs; logged: {', '.join(sorted(logged))}")
        out.append((key, [key] + ([f"eval/{key}"] if f"eval/{key}" in logged else [])))
    return out


def plot(runs: list[Path], out: Path, keys: list[str] | None = None) -> Path:
    """One panel per metric (see ``panels``); one colour per run, held-out curves dashed."""
    data = {run: read_metrics(run) for run in runs}
    layout = panels(list(data.values()), keys)
    if not layout:
        raise MMError(f"no numeric metrics to draw in {', '.join(str(run / 'metrics.jsonl') for run in runs)}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(layout), 1, figsize=(8, 2.6 * len(layout)), sharex=True, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, series) in zip(axes[:, 0], layout):
        for i, (run, rows) in enumerate(data.items()):
            for key in series:
                points = [(r["step"], r[key]) for r in rows if key in r]
                if not points:
                    continue
                held_out = key.startswith("eval/") and key != title
                label = run.name + (" (eval)" if held_out or key.startswith("eval/") else "")
                ax.plot(*zip(*points), color=colours[i % len(colours)], linestyle="--" if held_out else "-",
                        marker="o" if len(points) < 20 and key.startswith("eval/") else None, markersize=3,
                        label=label)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="upper right", fontsize="small")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def run(args: argparse.Namespace) -> int:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from mm.train.preflight import writable_file

    out = writable_file(args.out or args.runs[0] / "metrics.png", "--out", keep=False)
    formats = FigureCanvasAgg.get_supported_filetypes()
    if out.suffix.lstrip(".").lower() not in formats:
        raise MMError(f"--out {out}: give a file name ending in one of .{', .'.join(sorted(formats))}")
    keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else None
    print(plot(args.runs, out, keys))
    return 0
