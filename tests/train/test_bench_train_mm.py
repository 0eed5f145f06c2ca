"""tools.bench.train_mm at its tiny size on CPU: real steps through mm.train (the DeepSpeed engine, ZeRO-2, the
streaming loader over JPEG shards, packing), and a report whose figures agree with the run's own records."""
from __future__ import annotations

import json
import math

import pytest
import torch

import tests.train.train_helpers  # noqa: F401  (TORCH_EXTENSIONS_DIR: DeepSpeed's compiled op is cached)
from tools.bench import train_mm


def test_batch_stats_counts_documents_labels_and_padding():
    pad = 0
    # row 0: documents of 3 and 2 tokens, then 2 pads; row 1: one document of 6 tokens, then 1 pad
    ids = torch.tensor([[5, 6, 7, 8, 9, pad, pad], [5, 6, 7, 8, 9, 10, pad]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5, 0]])
    labels = torch.tensor([[-100, 6, 7, -100, 9, -100, -100], [-100, -100, -100, 8, 9, 10, -100]])
    stats = train_mm.batch_stats({"input_ids": ids, "position_ids": positions, "labels": labels,
                                  "pixel_values": torch.zeros(3, 3, 4, 4)}, pad)
    assert stats == {"tokens": 11, "labelled": 6, "images": 3, "rows": 2, "width": 7, "documents": 3,
                     "sum_sq_lengths": 9 + 4 + 36}


def test_tiny_run_through_the_trainer_reports_consistent_figures(tmp_path):
    from mm.config import load_config
    from mm.data import build_loader
    from mm.train import TrainConfig
    from mm.train.preflight import meta_model

    report = train_mm.measure("tiny", "cpu", workdir=tmp_path)
    size = train_mm.SIZES["tiny"]
    run = tmp_path / "run"

    # the run's own records: every step logged with its throughput; the exported model exists
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in logged] == list(range(1, size.warmup + size.steps + 1))
    assert all(line["tokens_per_s"] > 0 and math.isfinite(line["loss"]) for line in logged)
    assert all("grad_norm" in line for line in logged)  # ZeRO-2: DeepSpeed's norm, so the engine stepped
    assert (run / "final" / "mm_config.json").is_file()

    # the measured steps are the logged ones after the warm-up, with the loop's own tokens/s
    measured = report["measured"]
    assert [m["step"] for m in measured] == list(range(size.warmup + 1, size.warmup + size.steps + 1))
    for m in measured:
        assert m["tokens_per_s"] == logged[m["step"] - 1]["tokens_per_s"]
        assert m["seconds"] * m["tokens_per_s"] == approx(m["tokens"])

    # token counts are what the loader packs: the same stream, rebuilt apart from the run, batch by batch
    config = load_config(TrainConfig, [run / "config.yaml"])
    skeleton = meta_model(config)
    pad = skeleton.tokenizer.pad_token_id
    loader = iter(build_loader(config.data, skeleton, kind=config.stage.kind))
    packed = [next(loader) for _ in range(size.warmup + size.steps)][size.warmup:]
    assert [m["tokens"] for m in measured] == [int((b["input_ids"] != pad).sum()) for b in packed]
    assert [m["images"] for m in measured] == [b["pixel_values"].shape[0] for b in packed]
    assert all(0 < m["tokens"] <= size.batch_size * size.seq_len for m in measured)

    # the figures follow from the measured steps
    seconds = sum(m["seconds"] for m in measured)
    tokens = sum(m["tokens"] for m in measured)
    assert report["tokens_per_s"] > 0
    assert report["tokens_per_s"] == approx(tokens / seconds)
    assert report["tokens_per_step"] == approx(tokens / len(measured))
    model_flops = report["llm_flops_per_step"] + report["adapter_flops_per_step"] + report["tower_flops_per_step"]
    peak = report["peak_fp32_tflops"] * 1e12
    assert report["mfu"] == approx(model_flops * len(measured) / seconds / peak)
    assert 0 < report["tower_share"] < 1
    assert report["tower_share"] == approx(report["tower_flops_per_step"] / model_flops)
    assert report["mfu_with_attention"] > report["mfu"] > report["llm_mfu"] > 0
    assert report["llm_mfu_6n"] > report["llm_mfu"]  # the head runs at labelled positions only
    assert report["gpu_train_mfu"] == "n/a" and report["device"] == "cpu"
    assert report["attention"].startswith("mm_packed_sdpa")  # the loop's own line: per-document SDPA on CPU
    assert report["peak_memory_gb"] > 0

    # the parameter counts the FLOPs use are the trained model's (LLM; the tower as cut at select_layer -2)
    import mm

    trained = mm.load(run / "final")
    assert round(report["params_m"]["llm_total"] * 1e6) == sum(p.numel() for p in trained.llm.parameters())
    assert round(report["params_m"]["adapter"] * 1e6) == sum(p.numel() for p in trained.adapter.parameters())
    tower = getattr(trained.encoder.model, "vision_model", trained.encoder.model)
    assert len(tower.encoder.layers) == size.tower["num_hidden_layers"] - 1


def approx(value):
    return pytest.approx(value, rel=1e-9)
