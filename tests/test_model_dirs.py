"""Model directories from strangers (docs/security.md): nothing in them runs code, reads outside them or takes the
process down. Each hostile directory goes through the real ``mm`` command and must give exactly one
``mm: error: ...`` line, exit status 2, no traceback."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import mm
from mm.errors import MMError

MM = Path(sys.executable).with_name("mm")  # the installed console script


def run_mm(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(MM), *map(str, args)], capture_output=True, text=True, timeout=300)


def assert_one_line(result: subprocess.CompletedProcess, pattern: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("mm: error: "), result.stderr[-3000:]
    assert pattern in lines[0], lines[0]
    return lines[0]


@pytest.fixture()
def picture(tmp_path) -> Path:
    path = tmp_path / "red.png"
    Image.new("RGB", (32, 24), (200, 10, 10)).save(path)
    return path


@pytest.fixture()
def model_dir(tiny_model_dir, tmp_path) -> Path:
    """A fresh copy of the saved tiny model, to spoil."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


@pytest.fixture(scope="session")
def hf_tower_model_dir(tmp_path_factory) -> Path:
    """A saved model whose encoder is a transformers CLIP tower: it has ``encoder/config.json`` and
    ``encoder/preprocessor_config.json``, read by transformers when the model loads."""
    from mm.encoders.hf_encoder import example

    root = tmp_path_factory.mktemp("hf-tower")
    torch.manual_seed(0)
    model = mm.build(mm.ModelConfig(encoder=example(root), adapter="mlp", llm="tiny-llama"))
    model.save(root / "model")
    return root / "model"


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def plant_code(directory: Path, marker: Path) -> None:
    """``evil.py`` that writes ``marker`` when imported, the way transformers imports ``auto_map`` code."""
    (directory / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('code from the model directory ran')\n"
        "from transformers import LlamaConfig, PreTrainedTokenizerFast, CLIPImageProcessor\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
        "class EvilProcessor(CLIPImageProcessor):\n    pass\n")


def test_planted_code_runs_when_transformers_is_trusted(model_dir, tmp_path):
    """Guard: the planted ``auto_map`` really runs its code under ``trust_remote_code=True``, so the refusals
    below protect against something."""
    marker = tmp_path / "PWNED"
    plant_code(model_dir / "llm", marker)
    edit_json(model_dir / "llm" / "config.json", model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig"})
    code = (f"from transformers import AutoConfig\n"
            f"AutoConfig.from_pretrained({str(model_dir / 'llm')!r}, trust_remote_code=True)")
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert marker.exists()


@pytest.mark.parametrize("where, file, changes", [
    ("llm", "config.json", {"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig"}}),
    ("llm", "config.json", {"auto_map": {"AutoModelForCausalLM": "evil.EvilModel"}}),  # a known model_type too
    ("tokenizer", "tokenizer_config.json", {"tokenizer_class": "EvilTokenizer",
                                            "auto_map": {"AutoTokenizer": [None, "evil.EvilTokenizer"]}}),
], ids=["llm-unknown-type", "llm-known-type", "tokenizer"])
def test_auto_map_is_refused_and_its_code_never_runs(model_dir, picture, tmp_path, where, file, changes):
    marker = tmp_path / "PWNED"
    plant_code(model_dir / where, marker)
    edit_json(model_dir / where / file, **changes)
    assert_one_line(run_mm("caption", "--model", model_dir, picture), "auto_map")
    with pytest.raises(MMError, match="auto_map"):
        mm.load(model_dir)
    assert not marker.exists()


@pytest.mark.parametrize("file, changes", [
    ("config.json", {"auto_map": {"AutoConfig": "evil.EvilConfig"}}),
    ("preprocessor_config.json", {"image_processor_type": "EvilProcessor",
                                  "auto_map": {"AutoImageProcessor": "evil.EvilProcessor"}}),
], ids=["config", "image-processor"])
def test_auto_map_in_a_saved_encoder_is_refused(hf_tower_model_dir, picture, tmp_path, file, changes):
    model_dir = Path(shutil.copytree(hf_tower_model_dir, tmp_path / "model"))
    marker = tmp_path / "PWNED"
    plant_code(model_dir / "encoder", marker)
    edit_json(model_dir / "encoder" / file, **changes)
    assert_one_line(run_mm("caption", "--model", model_dir, picture), "auto_map")
    assert not marker.exists()


def test_a_saved_encoder_without_auto_map_still_loads(hf_tower_model_dir, picture):
    """Guard for the test above: the unspoilt directory captions."""
    result = run_mm("caption", "--model", hf_tower_model_dir, picture, "--max-new-tokens", 2)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("shard", ["../../etc/passwd", "/etc/passwd", "sub/model.safetensors", ".."])
def test_index_naming_a_file_outside_the_directory_is_refused(model_dir, picture, shard):
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": shard}}))
    assert_one_line(run_mm("caption", "--model", model_dir, picture), "outside its directory")


def rewrite_weights(directory: Path, change=None, aliases: str = "{}") -> None:
    path = directory / "model.safetensors"
    state = load_file(str(path))
    if change:
        change(state)
    save_file(state, str(path), metadata={"format": "pt", "aliases": aliases})


def shrink_adapter(state):
    state["adapter.mlp.0.weight"] = torch.zeros(3, 3)


HOSTILE = {
    # mm_config.json
    "config-wrong-type": (lambda d: edit_json(d / "mm_config.json", adapter={"name": "pool", "size": "big"}),
                          "config key adapter.size: expected int, got 'big'"),
    "config-not-an-object": (lambda d: (d / "mm_config.json").write_text("[]"), "must hold a JSON object"),
    "config-not-utf8": (lambda d: (d / "mm_config.json").write_bytes(b'{"dtype": "\xff"}'), "not valid JSON"),
    "config-nested-too-deep": (lambda d: (d / "mm_config.json").write_text("[" * 100_000 + "]" * 100_000),
                               "not valid JSON"),
    # alias metadata (tied weights) in the safetensors header or the index
    "aliases-not-a-mapping": (lambda d: rewrite_weights(d, aliases="[1, 2]"), "aliases metadata must map"),
    "alias-to-nothing": (lambda d: rewrite_weights(d, aliases='{"llm.lm_head.weight": "nope"}'), "names no tensor"),
    "aliases-not-json": (lambda d: rewrite_weights(d, aliases="{nope"), "cannot read weights"),
    "index-aliases-to-nothing": (lambda d: (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"x": "model.safetensors"}, "metadata": {"aliases": {"a": "nope"}}})), "names no tensor"),
    # tokenizer
    "tokenizer-missing": (lambda d: shutil.rmtree(d / "tokenizer"), "tokenizer is missing"),
    "tokenizer-garbage-json": (lambda d: (d / "tokenizer" / "tokenizer.json").write_text("{garbage"),
                               "cannot load the tokenizer"),
    "tokenizer-config-garbage-json": (lambda d: (d / "tokenizer" / "tokenizer_config.json").write_text("{garbage"),
                                      "cannot read"),
    "tokenizer-empty": (lambda d: [p.unlink() for p in (d / "tokenizer").iterdir()], "holds no tokenizer files"),
    # weights against the configs
    "weight-shape": (lambda d: rewrite_weights(d, shrink_adapter),
                     "adapter.mlp.0.weight is [3, 3] in the weights, [64, 32]"),
    "weights-not-safetensors": (lambda d: (d / "model.safetensors").write_bytes(b"garbage" * 10),
                                "cannot read weights"),
    "llm-config-wrong-type": (lambda d: edit_json(d / "llm" / "config.json", hidden_size="big"), "hidden_size"),
    "llm-config-negative-size": (lambda d: edit_json(d / "llm" / "config.json", hidden_size=-4), "-4"),
    "llm-config-unknown-type": (lambda d: edit_json(d / "llm" / "config.json", model_type="nope"), "nope"),
    "llm-config-not-an-object": (lambda d: (d / "llm" / "config.json").write_text('"llama"'),
                                 "must hold a JSON object"),
    # a terabyte of embeddings: refused by shape on the meta device, never allocated
    "llm-config-huge": (lambda d: edit_json(d / "llm" / "config.json", vocab_size=10**12), "do not fit its config"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_model_directory_is_one_error_line(model_dir, picture, case):
    spoil, message = HOSTILE[case]
    spoil(model_dir)
    assert_one_line(run_mm("caption", "--model", model_dir, picture), message)


def test_the_unspoilt_copy_captions(model_dir, picture):
    """Guard for the table above: the copy the cases spoil is a working model."""
    result = run_mm("caption", "--model", model_dir, picture, "--max-new-tokens", 2)
    assert result.returncode == 0 and result.stdout.startswith(str(picture)), result.stderr[-3000:]


def test_import_hf_refuses_auto_map_before_loading(tmp_path):
    hf_dir = tmp_path / "llava"
    hf_dir.mkdir()
    marker = tmp_path / "PWNED"
    plant_code(hf_dir, marker)
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "llava", "auto_map": {"AutoConfig": "evil.C"}}))
    save_file({"x": torch.zeros(1)}, str(hf_dir / "model.safetensors"))
    assert_one_line(run_mm("import-hf", "--hf", hf_dir, "--out", tmp_path / "out"), "auto_map")
    assert not marker.exists()


def test_inspect_refuses_a_tokenizer_with_auto_map(tiny_model_dir, tmp_path):
    tokenizer = Path(shutil.copytree(tiny_model_dir / "tokenizer", tmp_path / "tokenizer"))
    marker = tmp_path / "PWNED"
    plant_code(tokenizer, marker)
    edit_json(tokenizer / "tokenizer_config.json", auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]})
    assert_one_line(run_mm("inspect", tmp_path / "no-shards-needed", "--tokenizer", tokenizer), "auto_map")
    assert not marker.exists()
