"""The timing every benchmark shares: device synchronisation, interleaved repeats, paired ratios, matmul peak.

Ours and the peer are measured in the same process, their order alternating between repeats (a drift of the
machine's speed hits every variant alike); a ratio is the median of the per-repeat ratios.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable


def synchronizer(device: str) -> Callable[[], None]:
    """Waits for queued GPU work on a CUDA device; does nothing on the CPU."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


def seconds(call: Callable[[], object], sync: Callable[[], None] = lambda: None) -> float:
    """Wall seconds of one ``call()``, synchronised before and after."""
    sync()
    start = time.perf_counter()
    call()
    sync()
    return time.perf_counter() - start


def order(names: list[str], repeat: int) -> list[str]:
    """``names`` forwards on even repeats and backwards on odd ones."""
    return list(names) if repeat % 2 == 0 else list(names)[::-1]


def interleaved(calls: dict[str, Callable[[], object]], repeats: int,
                sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds of each named call in every repeat; the calls' order alternates between repeats."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for repeat in range(repeats):
        for name in order(list(calls), repeat):
            times[name].append(seconds(calls[name], sync))
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in times.items()}


def paired_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median over repeats of the ratio within each repeat (both sides measured seconds apart)."""
    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=True))


def matmul_peak(device: str = "cpu", dtype=None, n: int = 2048, batch: int = 1, rounds: int = 5,
                warmup: int = 1) -> float:
    """FLOP/s of an ``n x n x n`` ``torch.mm`` in ``dtype`` (default fp32): the best of ``rounds`` timings of
    ``batch`` back-to-back products, after ``warmup`` products."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    b = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    for _ in range(warmup):
        a @ b
    sync = synchronizer(device)
    best = min(seconds(lambda: [a @ b for _ in range(batch)], sync) for _ in range(rounds))
    return 2 * n**3 * batch / best
