"""Each tiny recipe runs end to end through the real DeepSpeed engine (single process, CPU, gloo):
frozen tensors bit-identical after the steps, trainable ones changed, the export loads with ``mm.load``."""
from __future__ import annotations

import json

import pytest
import torch

import mm
from mm.config import to_dict
from mm.loading import resolve_model_dir
from mm.train.build import build_student

from train_helpers import run, states_equal, tiny_config


@pytest.fixture(scope="module")
def bases(corpus, tmp_path_factory):
    """Runs the chained recipes start from: tiny align (-> instruct, dpo, distill_dft) and EViP S1.1."""
    root = tmp_path_factory.mktemp("bases")
    align = run(tiny_config("1_align", root / "align", corpus)).parent
    evip = run(tiny_config("evip_s1_1", root / "evip", corpus)).parent
    return {"align": align, "evip": evip}


CASES = {  # recipe -> (init_from base or None, globs that must have trained)
    "1_align": (None, ["adapter."]),
    "evip_s1_1": (None, ["encoder.", "adapter.", "moe.ffn_experts."]),
    "evip_s1_2": ("evip", ["encoder.", "adapter.", "moe.ffn_experts."]),
    "evip_s1_3": ("evip", ["encoder.", "adapter.", "moe.ffn_experts.", ".self_attn."]),
    "3_instruct": ("align", ["adapter.", "llm."]),
    "3_instruct_lora": ("align", ["adapter.", ".self_attn."]),
    "distill_dpt": (None, ["adapter."]),
    "distill_dft": ("align", ["adapter.", "llm."]),
    "dpo": ("align", ["adapter.", "llm."]),
}


@pytest.mark.parametrize("recipe", list(CASES))
def test_tiny_recipe_end_to_end(recipe, corpus, bases, tmp_path):
    base, must_train = CASES[recipe]
    overrides = [f"init_from={bases[base]}"] if base else []
    config = tiny_config(recipe, tmp_path / recipe, corpus, *overrides)
    before = {k: v.clone() for k, v in build_student(config).state_dict().items()}
    final = run(config)

    after = mm.load(final).state_dict()
    assert set(after) == set(before), "the export must have the plain model's names (LoRA merged)"
    changed = set(states_equal(before, after))
    for fragment in must_train:
        assert any(fragment in name for name in changed), f"nothing matching {fragment!r} trained"
    saved = json.loads(json.dumps(__import__("yaml").safe_load((tmp_path / recipe / "config.yaml").read_text())))
    assert saved["stage"]["trainable"] == to_dict(config.stage.trainable)
    trainable = [g.pattern for g in config.stage.trainable]
    import fnmatch

    frozen = [n for n in before if not any(fnmatch.fnmatchcase(n, p) for p in trainable)]
    if config.lora.enabled:  # LoRA merges a low-rank update into the targeted projections; the rest stays frozen
        frozen = [n for n in frozen if not any(f".{m}." in n for m in config.lora.target_modules)]
    assert frozen, "every recipe freezes something"
    moved = [n for n in frozen if n in changed]
    assert not moved, f"frozen tensors changed: {moved[:5]}"
    lines = [json.loads(line) for line in (tmp_path / recipe / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2] and all(torch.isfinite(torch.tensor(l["loss"])) for l in lines)


def test_init_from_accepts_run_or_model_dir(bases):
    assert resolve_model_dir(bases["align"]) == bases["align"] / "final"
    assert resolve_model_dir(bases["align"] / "final") == bases["align"] / "final"


@pytest.mark.parametrize("recipe,overrides", [
    ("1_align", ["trainer.precision=bf16", "trainer.zero_stage=2"]),
    ("distill_dpt", ["trainer.precision=bf16", "trainer.zero_stage=1", "stage.loss.kl=reverse"]),
])
def test_bf16_and_zero_stages(recipe, overrides, corpus, tmp_path):
    config = tiny_config(recipe, tmp_path / "run", corpus, *overrides)
    before = build_student(config).state_dict()
    after = mm.load(run(config)).state_dict()
    frozen = [n for n in before if n.startswith("llm.")]
    moved = [n for n in frozen if not torch.equal(before[n].to(torch.bfloat16).float(), after[n].float())]
    assert not moved, moved[:5]
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith("adapter."))
