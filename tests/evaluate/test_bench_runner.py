"""tools/bench.py: runs listed bench modules in one process, picks the headline figures, records skips."""
import importlib
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"


@pytest.fixture()
def bench(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(TOOLS))
    (tmp_path / "bench_fake_loader.py").write_text(
        "def run(quick=False):\n    return {'loader_samples_per_s': 30.0, 'packed_efficiency': 0.97}\n")
    (tmp_path / "bench_fake_train.py").write_text(
        "def run(quick=False, device='cpu'):\n"
        "    return {'train_samples_per_s': 10.0, 'mfu': 0.5, 'machine': {'cores': 2, 'torch_threads': 2}}\n")
    (tmp_path / "bench_broken.py").write_text("def run(quick=False):\n    raise RuntimeError('boom')\n")
    module = importlib.import_module("bench")
    monkeypatch.setitem(module.FIGURES, "packing_efficiency", (">= 0.95", ["bench_fake_loader:packed_efficiency"]))
    monkeypatch.setitem(module.FIGURES, "mfu", (">= 0.75", ["bench_fake_train:mfu"]))
    monkeypatch.setattr(module, "LOADER_RATE", ["bench_fake_loader:loader_samples_per_s"])
    monkeypatch.setattr(module, "TRAIN_RATE", ["bench_fake_train:train_samples_per_s"])
    yield module
    for name in ("bench_fake_loader", "bench_fake_train", "bench_broken"):
        sys.modules.pop(name, None)


def test_collect_and_markdown(bench, tmp_path):
    report = bench.collect(True, "cpu", ["bench_fake_loader", "bench_fake_train", "bench_broken", "bench_absent"])
    assert report["packing_efficiency"]["value"] == 0.97
    assert report["loader_headroom"]["value"] == pytest.approx(3.0)
    assert report["mfu"]["value"] == 0.5 and report["mfu"]["machine"]["torch_threads"] == 2
    assert report["generate_speedup"]["value"] is None and "not run" in report["generate_speedup"]["reason"]
    assert "boom" in report["skipped"]["bench_broken"]
    assert "does not exist" in report["skipped"]["bench_absent"]
    for key in ("generate_speedup", "first_token_speedup", "train_speedup", "packing_efficiency", "loader_headroom",
                "moe_overhead", "mfu"):
        assert "machine" in report[key] and "cores" in report[key]["machine"]
    text = bench.markdown(report)
    assert "| packing_efficiency | 0.970 | >= 0.95 | yes |" in text
    assert "| mfu | 0.500 | >= 0.75 | no |" in text


def test_regeneration_keeps_the_hand_run_section(bench, tmp_path):
    target = tmp_path / "BENCHMARKS.md"
    target.write_text(f"# old table\n\n{bench.KEEP_MARKER}\n## Learning check\naccuracy 0.9\n")
    kept = bench.kept_section(str(target))
    assert kept.startswith("\n" + bench.KEEP_MARKER) and "accuracy 0.9" in kept and "old table" not in kept
    assert bench.kept_section(str(tmp_path / "missing.md")) == ""
