"""Every ``mm`` path as a security reviewer tries it: wrong values in flags, outputs that cannot be written, inputs
that are not what they claim, a reader that goes away. Each is one ``mm: error: ...`` line and exit status 2 (or a
quiet end), never a traceback."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

MM = Path(sys.executable).with_name("mm")  # the installed console script


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """Files to point the commands at: a picture, shards, a file where a directory is expected, broken inputs."""
    from mm.data import make_synthetic

    root = tmp_path_factory.mktemp("hostile")
    Image.new("RGB", (32, 24), (200, 10, 10)).save(root / "red.png")
    make_synthetic(root / "shards", n=4, n_val=4)
    (root / "file").write_text("x")
    (root / "table.csv").write_bytes(b"\x00\x01 not a table")
    (root / "table.parquet").write_bytes(b"PAR1 not parquet")
    (root / "urls.csv").write_text("url,caption\nhttps://example.invalid/a.png,red\n")
    (root / "llava.json").write_text(json.dumps([{"image": "red.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "red"}]}]))
    runs = {"not-rows": '1\n"x"\n', "no-step": '{"loss": 1.0}\n', "words": '{"step": 1, "loss": "hi"}\n',
            "good": '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n'}
    for name, text in runs.items():
        (root / name).mkdir()
        (root / name / "metrics.jsonl").write_text(text)
    return {"root": str(root), "img": str(root / "red.png"), "shards": str(root / "shards" / "val"),
            "file": str(root / "file")}


def cases(model: str, i: dict[str, str]) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments, what the one error line says)."""
    r, img, shards, file = i["root"], i["img"], i["shards"], i["file"]
    return {
        "caption --batch-size 0": (["caption", "--model", model, img, "--batch-size", "0"], "--batch-size must be"),
        "caption --batch-size -1": (["caption", "--model", model, img, "--batch-size", "-1"], "--batch-size must be"),
        "caption --device foo": (["caption", "--model", model, img, "--device", "foo"], "is not a device"),
        "caption --device meta": (["caption", "--model", model, img, "--device", "meta"], "mm runs models on"),
        "caption --device cpu:3": (["caption", "--model", model, img, "--device", "cpu:3"], "mm runs models on"),
        "caption --max-new-tokens -1": (["caption", "--model", model, img, "--max-new-tokens", "-1"], "at least 1"),
        "caption --temperature nan": (["caption", "--model", model, img, "--temperature", "nan"], "finite"),
        "caption --temperature inf": (["caption", "--model", model, img, "--temperature", "inf"], "finite"),
        "caption --seed 1e30": (["caption", "--model", model, img, "--seed", str(10**30)], "--seed"),
        "vqa --num-beams 0": (["vqa", "--model", model, img, "q", "--num-beams", "0"], "--num-beams"),
        "eval --out in /proc": (["eval", "--model", model, "--data", shards, "--task", "caption",
                                 "--out", "/proc/mm-eval.json"], "not a writable directory"),
        "eval --out under a file": (["eval", "--model", model, "--data", shards, "--task", "caption",
                                     "--out", f"{file}/eval.json"], "not a writable directory"),
        "inspect --tokens-per-image 0": (["inspect", shards, "--tokens-per-image", "0"], "--tokens-per-image"),
        "inspect --tokenizer not one": (["inspect", shards, "--tokenizer", r], "holds no tokenizer files"),
        "convert --out under a file": (["convert", "llava", f"{r}/llava.json", "--images", r, "--out", f"{file}/o",
                                        "--quiet"], "not a writable directory"),
        "convert --out in /proc": (["convert", "llava", f"{r}/llava.json", "--images", r, "--out", "/proc/mm-o",
                                    "--quiet"], "not a writable directory"),
        "convert --images missing": (["convert", "llava", f"{r}/llava.json", "--images", f"{r}/nope",
                                      "--out", f"{r}/o1"], "image root not found"),
        "convert captions not a table": (["convert", "captions", f"{r}/table.csv", "--out", f"{r}/o2", "--quiet"],
                                         "cannot read the table"),
        "convert captions not parquet": (["convert", "captions", f"{r}/table.parquet", "--out", f"{r}/o3",
                                          "--quiet"], "cannot read the table"),
        "convert moscar not parquet": (["convert", "moscar", f"{r}/table.parquet", "--images", r, "--out",
                                        f"{r}/o4", "--quiet"], "cannot read the table"),
        "convert --deadline nan": (["convert", "captions", f"{r}/urls.csv", "--download", "--deadline", "nan",
                                    "--out", f"{r}/o5"], "--deadline"),
        "export-hf --max-shard-size big": (["export-hf", "--model", model, "--out", f"{r}/e1",
                                            "--max-shard-size", "big"], "is not a size"),
        "import-hf --out under a file": (["import-hf", "--hf", r, "--out", f"{file}/i"], "not a writable directory"),
        "plot rows that are not objects": (["plot", f"{r}/not-rows"], "not a metrics row"),
        "plot rows without a step": (["plot", f"{r}/no-step"], "not a metrics row"),
        "plot nothing numeric": (["plot", f"{r}/words"], "no numeric metrics"),
        "plot --out unknown format": (["plot", f"{r}/good", "--out", f"{r}/curves.xyz"], "give a file name ending"),
        "plot --out a directory": (["plot", f"{r}/good", "--out", r], "is a directory"),
        "plot --out under a file": (["plot", f"{r}/good", "--out", f"{file}/c.png"], "not a writable directory"),
        "make-synthetic --out in /proc": (["make-synthetic", "--out", "/proc/mm-synthetic", "--n", "2"],
                                          "not a writable directory"),
        "precompute-ref no shards": (["precompute-ref", "--model", model, f"{r}/nope", f"{r}/p1"], "no shards found"),
        "precompute-ref --seq-len 0": (["precompute-ref", "--model", model, shards, f"{r}/p2", "--seq-len", "0"],
                                       "--seq-len"),
        "precompute-ref out under a file": (["precompute-ref", "--model", model, shards, f"{file}/p"],
                                            "not a writable directory"),
        "serve --max-image-mb nan": (["serve", "--model", model, "--max-image-mb", "nan"], "finite"),
    }


CASES = list(cases("MODEL", {"root": "", "img": "", "shards": "", "file": ""}))


@pytest.mark.parametrize("case", CASES)
def test_hostile_invocation_is_one_error_line(case, tiny_model_dir, inputs, capsys):
    from mm.cli import main

    args, message = cases(str(tiny_model_dir), inputs)[case]
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("mm: error: "), err[-3000:]
    assert message in lines[0], lines[0]


def test_a_full_disk_on_stdout_is_one_error_line(tiny_model_dir, inputs):
    with open("/dev/full", "w") as full:
        result = subprocess.run([str(MM), "inspect", inputs["shards"], "--json"], stdout=full, stderr=subprocess.PIPE,
                                text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr == "mm: error: No space left on device\n", result.stderr[-3000:]


def test_a_reader_that_goes_away_ends_caption_quietly(tiny_model_dir, inputs):
    """``mm caption ... | head -1``: the pipe closes after the first caption; the rest is not a traceback."""
    images = " ".join([inputs["img"]] * 40)
    result = subprocess.run(f"set -o pipefail; '{MM}' caption --model '{tiny_model_dir}' {images} --batch-size 1 "
                            "--max-new-tokens 2 | head -1", shell=True, executable="/bin/bash", capture_output=True,
                            text=True, timeout=300)
    assert result.stdout.startswith(inputs["img"]) and len(result.stdout.splitlines()) == 1
    assert result.stderr == ""
    assert result.returncode == 1  # what Python exits with on a closed pipe (EPIPE), as pipefail shows


def test_the_same_pipeline_without_head_prints_every_caption(tiny_model_dir, inputs):
    """Guard for the test above: the caption loop runs long enough (40 lines) for ``head`` to close it early."""
    result = subprocess.run([str(MM), "caption", "--model", str(tiny_model_dir), *[inputs["img"]] * 40,
                             "--batch-size", "8", "--max-new-tokens", "2"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 40, result.stderr[-3000:]
