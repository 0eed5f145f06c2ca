#!/usr/bin/env python
"""Draw a run's loss curves (and the other logged metrics) from RUN/metrics.jsonl to RUN/metrics.png.

    python tools/plot_metrics.py RUN [RUN2 ...] [--out curves.png] [--keys loss,lm]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (is {run} a training run directory?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(runs: list[Path], out: Path, keys: list[str] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {run: read_metrics(run) for run in runs}
    skip = {"step", "lr", "tokens_per_s", "grad_norm"}
    keys = keys or sorted({k for rows in data.values() for row in rows for k in row if k not in skip})
    panels = keys + ["lr", "tokens_per_s"]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], panels):
        for run, rows in data.items():
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), label=run.name)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="upper right")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="PNG path (default RUN/metrics.png of the first run)")
    parser.add_argument("--keys", help="comma-separated metrics to draw (default: every loss term)")
    args = parser.parse_args(argv)
    try:
        out = plot(args.runs, args.out or args.runs[0] / "metrics.png", args.keys.split(",") if args.keys else None)
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        print(f"mm: error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
