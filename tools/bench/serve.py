"""Load test for ``mm serve``: requests/s and p50/p95 latency at 1, 4 and 16 concurrent clients, and the
speedup of batched serving (``--max-batch 16``) over one-at-a-time serving (``--max-batch 1``).

Both servers run side by side as real ``mm serve`` processes on 127.0.0.1 with the same saved model; load rounds
alternate between them (interleaved, the order alternating) and each figure is the median over repeats. Bounded: a
fixed request count per round and an overall deadline. Loopback only.

    python -m tools.bench.serve [--quick] [--model tiny|lite]
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

from tools.bench.timing import order, paired_ratio

MODELS = {
    "tiny": dict(encoder="tiny-vit", adapter="mlp", llm="tiny-llama"),
    "lite": dict(encoder="timm:tf_efficientnet_lite0", adapter="pool", llm="smollm2-135m"),
}
QUESTIONS = ["what color is it?", "describe the picture", "how many shapes are there?", "where is the circle?"]


def _image_url(color: str) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _start(model_dir: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "mm", "serve", "--model", str(model_dir), "--port", "0", "--model-name", "bench",
         "--max-batch", str(max_batch), "--max-queue", "512", "--batch-wait-ms", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    banner = process.stdout.readline()
    match = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", banner)
    if not match:
        process.kill()
        raise RuntimeError(f"mm serve did not start: {banner}{process.stdout.read()}")
    url = match.group(1)
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError("mm serve did not answer /health")


async def _round(url: str, concurrency: int, total: int, max_tokens: int, deadline: float) -> dict:
    """``total`` requests from ``concurrency`` clients; each client sends its next request when one returns."""
    images = [_image_url(c) for c in ("red", "green", "blue", "yellow")]
    latencies: list[float] = []
    tokens = 0
    next_index = 0

    async def client(http: httpx.AsyncClient):
        nonlocal next_index, tokens
        while next_index < total and time.monotonic() < deadline:
            i = next_index
            next_index += 1
            body = {"model": "bench", "max_tokens": max_tokens, "temperature": 0, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": images[i % len(images)]}},
                {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]}]}
            start = time.perf_counter()
            response = await http.post(url + "/v1/chat/completions", json=body)
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)
            tokens += response.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    wall = time.perf_counter() - start
    latencies.sort()
    quantile = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    return {"requests": len(latencies), "requests_per_s": len(latencies) / wall, "tokens_per_s": tokens / wall,
            "p50_s": quantile(0.5), "p95_s": quantile(0.95)}


def run(quick: bool = False, model: str = "tiny") -> dict:
    import mm

    levels = [1, 4, 16]
    repeats = 1 if quick else 3
    max_tokens = 8 if quick else 16
    budget = 240 if quick else 1200
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / model
        mm.build(mm.ModelConfig(**MODELS[model])).save(model_dir)
        servers = {"batched": _start(model_dir, 16), "single": _start(model_dir, 1)}
        try:
            deadline = time.monotonic() + budget
            for _, url in servers.values():  # warm-up: first-call costs stay out of the figures
                asyncio.run(_round(url, 4, 8, max_tokens, deadline))
            rounds: dict[str, dict[int, list[dict]]] = {k: {c: [] for c in levels} for k in servers}
            for concurrency in levels:
                total = max(4, 2 * concurrency) if quick else max(8, 4 * concurrency)
                for repeat in range(repeats):
                    for kind in order(list(servers), repeat):
                        url = servers[kind][1]
                        rounds[kind][concurrency].append(
                            asyncio.run(_round(url, concurrency, total, max_tokens, deadline)))
            stats = {kind: json.loads(httpx.get(url + "/health").text) for kind, (_, url) in servers.items()}
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(timeout=30)
    result: dict = {"model": model, "max_tokens": max_tokens, "repeats": repeats, "largest_batch":
                    stats["batched"]["largest_batch"]}
    for kind in servers:
        for concurrency in levels:
            runs = rounds[kind][concurrency]
            for key in ("requests_per_s", "p50_s", "p95_s"):
                result[f"{kind}_c{concurrency}_{key}"] = round(statistics.median(r[key] for r in runs), 4)
    for concurrency in levels:
        rates = {kind: [r["requests_per_s"] for r in rounds[kind][concurrency]] for kind in servers}
        result[f"batching_speedup_c{concurrency}"] = round(paired_ratio(rates["batched"], rates["single"]), 2)
    result["throughput_growth_c16_over_c1"] = round(
        result["batched_c16_requests_per_s"] / result["batched_c1_requests_per_s"], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    args = parser.parse_args()
    print(json.dumps(run(quick=args.quick, model=args.model), indent=2))


if __name__ == "__main__":
    main()
