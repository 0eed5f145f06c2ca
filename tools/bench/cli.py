"""How fast the ``mm`` command answers ``--help`` (subcommands import lazily; goal: under 1.5 s).

    python -m tools.bench.cli

Runs the installed console script beside this interpreter as a fresh process each time, so every run pays the
interpreter start and the imports a user pays; the figure is the median of the runs.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def command() -> list[str]:
    script = Path(sys.executable).with_name("mm")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "mm"]


def run(quick: bool = False) -> dict:
    times = []
    for _ in range(3 if quick else 7):
        start = time.perf_counter()
        subprocess.run([*command(), "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return {"help_s": statistics.median(times), "help_s_max": max(times), "runs": len(times)}


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
