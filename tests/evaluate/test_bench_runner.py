"""``python -m tools.bench``: runs the listed modules of tools.bench in one process, picks the headline figures,
records skips; every figure names a key its module emits; the shared timing helper interleaves and pairs."""
import re
import sys
import types
from pathlib import Path

import pytest

from tools.bench import aggregate, timing

BENCH = Path(aggregate.__file__).parent


def fake_module(monkeypatch, name: str, run) -> None:
    """``tools.bench.<name>`` with this ``run``, found by ``importlib.import_module`` in sys.modules."""
    module = types.ModuleType(f"tools.bench.{name}")
    module.run = run
    monkeypatch.setitem(sys.modules, module.__name__, module)


@pytest.fixture()
def bench(monkeypatch):
    fake_module(monkeypatch, "fake_loader", lambda quick=False: {"loader_samples_per_s": 30.0,
                                                                 "packed_efficiency": 0.97})
    fake_module(monkeypatch, "fake_train", lambda quick=False, device="cpu": {
        "train_samples_per_s": 10.0, "mfu": 0.5, "machine": {"cores": 2, "torch_threads": 2}})

    def broken(quick=False):
        raise RuntimeError("boom")

    fake_module(monkeypatch, "broken", broken)
    monkeypatch.setitem(aggregate.FIGURES, "packing_efficiency", (">= 0.95", "fake_loader:packed_efficiency"))
    monkeypatch.setitem(aggregate.FIGURES, "mfu", (">= 0.75", "fake_train:mfu"))
    monkeypatch.setitem(aggregate.FIGURES, "loader_headroom",
                        (">= 2", "fake_loader:loader_samples_per_s / fake_train:train_samples_per_s"))
    return aggregate


def test_collect_and_markdown(bench):
    report = bench.collect(True, "cpu", ["fake_loader", "fake_train", "broken", "absent"])
    assert report["packing_efficiency"]["value"] == 0.97
    assert report["loader_headroom"]["value"] == pytest.approx(3.0)
    assert report["mfu"]["value"] == 0.5 and report["mfu"]["machine"]["torch_threads"] == 2
    assert report["generate_speedup"]["value"] is None and "not run" in report["generate_speedup"]["reason"]
    assert "boom" in report["skipped"]["broken"]
    assert "does not exist" in report["skipped"]["absent"]
    for key in ("generate_speedup", "first_token_speedup", "train_speedup", "packing_efficiency", "loader_headroom",
                "moe_overhead", "mfu"):
        assert "machine" in report[key] and "cores" in report[key]["machine"]
    text = bench.markdown(report)
    assert "| packing_efficiency | 0.970 | >= 0.95 | yes |" in text
    assert "| mfu | 0.500 | >= 0.75 | no |" in text
    assert "python -m tools.bench --markdown" in text


def test_every_figure_names_a_key_its_module_emits():
    """Guards the FIGURES table against keys no benchmark writes (a figure that would always read n/a)."""
    for figure, (_, source) in aggregate.FIGURES.items():
        for key in source.split(" / "):
            module, _, path = key.strip().partition(":")
            text = (BENCH / f"{module}.py").read_text()
            for part in path.split("."):
                assert re.search(rf"""["']{re.escape(part)}["']\s*:""", text), (figure, module, part)


def test_the_key_check_can_fail(monkeypatch):
    monkeypatch.setitem(aggregate.FIGURES, "moe_overhead", ("<= 1.15", "moe:moe_overhead"))
    with pytest.raises(AssertionError):
        test_every_figure_names_a_key_its_module_emits()


def test_regeneration_keeps_the_hand_run_section(tmp_path):
    target = tmp_path / "BENCHMARKS.md"
    target.write_text(f"# old table\n\n{aggregate.KEEP_MARKER}\n## Learning check\naccuracy 0.9\n")
    kept = aggregate.kept_section(str(target))
    assert kept.startswith("\n" + aggregate.KEEP_MARKER) and "accuracy 0.9" in kept and "old table" not in kept
    assert aggregate.kept_section(str(tmp_path / "missing.md")) == ""


def test_interleaved_timing_alternates_the_order_and_pairs_ratios():
    calls = []
    times = timing.interleaved({name: (lambda name=name: calls.append(name)) for name in "abc"}, repeats=3)
    assert calls == list("abccbaabc") and all(len(t) == 3 and min(t) >= 0 for t in times.values())
    assert timing.paired_ratio([2.0, 9.0, 4.0], [1.0, 3.0, 1.0]) == 3.0  # median of 2, 3, 4
