"""Benchmarks: one module per topic, each with ``run(quick=False[, device=...]) -> dict`` and a ``main()``.

    python -m tools.bench [--quick] [--device cpu|cuda] [--markdown BENCHMARKS.md]   # all of them (aggregate.py)
    python -m tools.bench.generate [--quick]                                          # one of them

Run from the repository root. Timing, synchronisation and interleaving live in ``tools/bench/timing.py``.
"""
