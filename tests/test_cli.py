"""The `mm` command as a user runs it: a real subprocess on a saved tiny model."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image


def run_mm(*args, stdin: str | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mm", *map(str, args)], input=stdin, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


@pytest.fixture()
def picture(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (48, 32), (220, 20, 20)).save(path)
    return path


class InProcess:
    """The same `mm` entry point called in this process (no interpreter start-up): returncode, stdout, stderr."""

    def __init__(self, capsys):
        self.capsys = capsys

    def __call__(self, *args) -> subprocess.CompletedProcess:
        from mm.cli import main

        self.capsys.readouterr()
        code = main(list(map(str, args)))
        captured = self.capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)


@pytest.fixture()
def mm_main(capsys):
    return InProcess(capsys)


def assert_clean_error(result, pattern: str):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("mm: error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert pattern in lines[-1], lines[-1]


def test_caption_json_lines(tiny_model_dir, picture, tmp_path):
    second = tmp_path / "blue.jpg"
    Image.new("RGB", (30, 30), (0, 0, 255)).save(second)
    result = run_mm("caption", "--model", tiny_model_dir, picture, second, "--json", "--max-new-tokens", 5)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["image"] for row in rows] == [str(picture), str(second)]
    assert all(isinstance(row["caption"], str) for row in rows)


def test_caption_is_deterministic_and_matches_the_library(tiny_model_dir, picture):
    import mm
    from mm.images import open_image

    expected = mm.load(tiny_model_dir).generate(
        images=[open_image(picture)], messages=[{"role": "user", "content": [{"type": "image"}]}], chat=False,
        max_new_tokens=6).strip()
    result = run_mm("caption", "--model", tiny_model_dir, picture, "--max-new-tokens", 6)
    assert result.stdout == f"{picture}\t{expected}\n"


def test_vqa_and_sampling_flags(tiny_model_dir, picture, mm_main):
    result = mm_main("vqa", "--model", tiny_model_dir, picture, "what colour?", "--temperature", 0.7, "--top-p", 0.9,
                    "--seed", 3, "--max-new-tokens", 4, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["question"] == "what colour?"
    beams = mm_main("vqa", "--model", tiny_model_dir, picture, "q", "--num-beams", 2, "--max-new-tokens", 3)
    assert beams.returncode == 0, beams.stderr


def test_chat_is_multi_turn_and_streams(tiny_model_dir, picture):
    result = run_mm("chat", "--model", tiny_model_dir, "--image", picture, "--max-new-tokens", 4,
                    stdin="hello\nand again\n/quit\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("mm> ") == 2


def test_chat_explains_how_to_attach_a_typed_image_and_goes_on(tiny_model_dir):
    result = run_mm("chat", "--model", tiny_model_dir, "--max-new-tokens", 3,
                    stdin="what is in <image> here?\nhello\n/quit\n")
    assert result.returncode == 0, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("mm: error: ") and "/image PATH" in errors[0], result.stderr
    assert result.stdout.count("mm> ") == 1  # the typed <image> got no answer; the next message did


def test_batch_caption_keeps_results_around_a_bad_image(tiny_model_dir, picture, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    result = run_mm("caption", "--model", tiny_model_dir, picture, broken, picture, "--batch-size", 1,
                    "--max-new-tokens", 3)
    assert result.returncode == 2
    assert result.stdout.count(str(picture)) == 2
    assert "cannot read image" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("case", ["missing", "truncated", "bomb", "not-image", "empty"])
def test_bad_images(tiny_model_dir, tmp_path, case, mm_main):
    path = tmp_path / f"{case}.png"
    if case == "truncated":
        Image.new("RGB", (64, 64), (9, 9, 9)).save(path)
        path.write_bytes(path.read_bytes()[:60])
    elif case == "bomb":
        Image.new("1", (10_000, 10_000)).save(path)
    elif case == "not-image":
        path.write_text("hello")
    elif case == "empty":
        path.write_bytes(b"")
    result = mm_main("vqa", "--model", tiny_model_dir, path, "q")
    expected = {"missing": "image not found", "truncated": "cannot read image", "bomb": "too large",
                "not-image": "cannot read image", "empty": "empty"}[case]
    assert_clean_error(result, expected)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_non_rgb_modes_caption(tiny_model_dir, tmp_path, mode, mm_main):
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    Image.new(mode, (16, 16)).save(path)
    result = mm_main("caption", "--model", tiny_model_dir, path, "--max-new-tokens", 2)
    assert result.returncode == 0, result.stderr


def test_bad_model_directories(tiny_model_dir, picture, tmp_path, mm_main):
    assert_clean_error(mm_main("caption", "--model", tmp_path / "nope", picture), "model directory not found")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").unlink()
    (broken / "pytorch_model.bin").write_bytes(b"pickle")
    assert_clean_error(mm_main("caption", "--model", broken, picture), "pickled weights")
    shutil.rmtree(broken / "tokenizer")
    assert_clean_error(mm_main("caption", "--model", broken, picture), "tokenizer is missing")


def test_bad_flags(tiny_model_dir, picture, mm_main):
    assert_clean_error(mm_main("caption", "--model", tiny_model_dir, picture, "--max-new-tokens", 0), "at least 1")
    assert_clean_error(mm_main("caption", "--model", tiny_model_dir, picture, "--device", "cuda:0"), "no CUDA")


def test_compiled_caption_equals_eager(tiny_model_dir, picture, tmp_path):
    second = tmp_path / "blue.png"
    Image.new("RGB", (30, 40), (20, 20, 220)).save(second)
    eager = run_mm("caption", "--model", tiny_model_dir, picture, second, "--max-new-tokens", 6, "--batch-size", 1)
    compiled = run_mm("caption", "--model", tiny_model_dir, picture, second, "--max-new-tokens", 6, "--batch-size", 1,
                      "--compile", timeout=600)
    assert compiled.returncode == 0, compiled.stderr[-2000:]
    assert compiled.stdout == eager.stdout and len(eager.stdout.splitlines()) == 2


ROOT = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = Path(sys.executable).with_name("mm")  # what `pip install` wrote for [project.scripts]


def console_mm(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(CONSOLE_SCRIPT), *args], capture_output=True, text=True, timeout=120)


SUBCOMMANDS = ("caption", "vqa", "chat", "serve", "eval", "train", "convert", "inspect", "make-synthetic",
               "precompute-ref", "export-hf", "import-hf", "plot")


def test_every_subcommand_answers_help_through_the_installed_command():
    from mm.cli import COMMANDS

    assert len(COMMANDS) == len(SUBCOMMANDS)
    for name in [None, *SUBCOMMANDS]:
        result = console_mm(*([name] if name else []), "--help")
        assert result.returncode == 0 and result.stderr == "", (name, result.stderr)
        assert result.stdout.startswith(f"usage: mm {name or ''}".rstrip()), (name, result.stdout[:200])


def test_version():
    import mm

    result = console_mm("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"mm {mm.__version__}"
    assert mm.__version__[0].isdigit()


def test_building_the_parser_imports_no_heavy_library():
    code = "import sys, mm.cli; mm.cli.parser(); print(sorted({'torch', 'transformers', 'numpy'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


@pytest.mark.parametrize("args, message", [
    ([], "required: COMMAND"),
    (["nope"], "invalid choice: 'nope'"),
    (["caption", "x.png"], "required: --model"),
    (["convert", "llava"], "see 'mm convert llava --help'"),
])
def test_bad_arguments_are_one_error_line(args, message, capsys):
    from mm.cli import main

    with pytest.raises(SystemExit) as stop:
        main(args)
    err = capsys.readouterr().err
    assert_clean_error(subprocess.CompletedProcess(args, stop.value.code, "", err), message)
    assert len(err.splitlines()) == 1


def test_train_passes_its_arguments_to_the_recipes_entry(mm_main, tmp_path):
    assert_clean_error(mm_main("train", "trainer.max_steps=1"), "give --config")
    assert_clean_error(mm_main("train", "--config", tmp_path / "missing.yaml", "trainer.max_steps=1"), "missing.yaml")


def test_eval_task_choices_match_the_evaluator():
    from mm.commands.evaluate import TASKS
    from mm.evaluate.samples import TASKS as EVALUATED

    assert TASKS == EVALUATED


def test_no_file_edits_the_import_path():
    needle = ".".join(["sys", "path"])  # spelled so that this file does not match itself
    offenders = [str(path.relative_to(ROOT)) for folder in ("mm", "tools", "recipes", "tests")
                 for path in (ROOT / folder).rglob("*")
                 if path.is_file() and "__pycache__" not in path.parts and needle.encode() in path.read_bytes()]
    assert offenders == []
