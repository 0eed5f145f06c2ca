"""``mm vqa`` with several images (``--image PATH`` repeated, ``<image>`` markers placing them), its one-image
positional form, its one-line errors, and ``mm chat`` taking the same images (``--image`` repeated, ``/image``)."""
from __future__ import annotations

import io
import json
import subprocess

import pytest
from PIL import Image

import mm
from mm.images import open_image

GREEDY = ("--max-new-tokens", 6)


class InProcess:
    """The ``mm`` entry point called in this process: returncode, stdout, stderr."""

    def __init__(self, capsys):
        self.capsys = capsys

    def __call__(self, *args) -> subprocess.CompletedProcess:
        from mm.cli import main

        self.capsys.readouterr()
        try:
            code = main(list(map(str, args)))
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
        captured = self.capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)


@pytest.fixture()
def mm_main(capsys):
    return InProcess(capsys)


@pytest.fixture()
def pictures(tmp_path):
    """Two images that differ in size and colour (so swapping them changes what the model sees)."""
    paths = [tmp_path / "red.png", tmp_path / "blue.jpg"]
    Image.new("RGB", (48, 32), (220, 20, 20)).save(paths[0])
    Image.new("RGB", (30, 40), (10, 40, 230)).save(paths[1])
    return paths


@pytest.fixture(scope="module")
def library(tiny_model_dir):
    return mm.load(tiny_model_dir)


def expected(library, paths, prompt: str) -> str:
    return library.generate(images=[open_image(p) for p in paths], prompt=prompt, max_new_tokens=6).strip()


def one_error(result, pattern: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("mm: error: ") and pattern in lines[0], result.stderr


def test_two_images_answer_as_the_library_does(tiny_model_dir, pictures, library, mm_main):
    a, b = pictures
    result = mm_main("vqa", "--model", tiny_model_dir, "--image", a, "--image", b, "what differs?", "--json",
                     *GREEDY)
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert row["images"] == [str(a), str(b)] and row["image"] == str(a) and row["question"] == "what differs?"
    assert row["answer"] == expected(library, [a, b], "what differs?")


def test_the_images_reach_the_model_in_the_order_given(tiny_model_dir, pictures, mm_main, monkeypatch):
    from mm.model import MultimodalModel

    seen = []
    generate = MultimodalModel.generate

    def spy(self, images=None, prompt="", **kwargs):
        seen.append(([image.size for image in images], prompt))
        return generate(self, images=images, prompt=prompt, **kwargs)

    monkeypatch.setattr(MultimodalModel, "generate", spy)
    a, b = pictures
    for order in ([a, b], [b, a]):
        flags = [arg for path in order for arg in ("--image", path)]
        assert mm_main("vqa", "--model", tiny_model_dir, *flags, "q", *GREEDY).returncode == 0
    assert seen == [([(48, 32), (30, 40)], "q"), ([(30, 40), (48, 32)], "q")]


def test_markers_place_the_images_in_the_question(tiny_model_dir, pictures, library, mm_main):
    a, b = pictures
    question = "is <image> redder than <image>?"
    result = mm_main("vqa", "--model", tiny_model_dir, "--image", a, "--image", b, question, *GREEDY)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected(library, [a, b], question)
    one_error(mm_main("vqa", "--model", tiny_model_dir, "--image", a, "--image", b, "only <image>?"),
              "1 <image> markers but 2 images")


def test_the_positional_image_still_works(tiny_model_dir, pictures, library, mm_main):
    a, _ = pictures
    result = mm_main("vqa", "--model", tiny_model_dir, a, "what colour?", "--json", *GREEDY)
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert row["images"] == [str(a)] and row["image"] == str(a)
    assert row["answer"] == expected(library, [a], "what colour?")
    single = mm_main("vqa", "--model", tiny_model_dir, "--image", a, "what colour?", *GREEDY)
    assert single.stdout.strip() == row["answer"]
    between = mm_main("vqa", "--model", tiny_model_dir, a, "--json", *GREEDY, "what colour?")
    assert between.returncode == 0, between.stderr  # flags between IMAGE and QUESTION (argparse: intermixed)
    assert json.loads(between.stdout) == row


@pytest.mark.parametrize("case", ["missing-second", "broken-first", "both-forms", "no-image"])
def test_bad_images_are_one_line(case, tiny_model_dir, pictures, tmp_path, mm_main):
    a, b = pictures
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    args, pattern = {
        "missing-second": (["--image", a, "--image", tmp_path / "nope.png"], "image not found"),
        "broken-first": (["--image", broken, "--image", b], "cannot read image"),
        "both-forms": (["--image", b, a], "not both"),
        "no-image": ([], "no image"),
    }[case]
    one_error(mm_main("vqa", "--model", tiny_model_dir, *args, "q"), pattern)


def test_chat_takes_the_same_images_by_flag_and_by_command(tiny_model_dir, pictures, library, capsys,
                                                           monkeypatch):
    """``mm chat --image a --image b`` and ``/image a b`` both give the first message both images, in order:
    the same answer as ``mm vqa --image a --image b``."""
    from mm.cli import main

    a, b = pictures
    answer = expected(library, [a, b], "what differs?")
    for args, typed in [(["--image", a, "--image", b], ""), ([], f"/image {a} {b}\n")]:
        monkeypatch.setattr("sys.stdin", io.StringIO(f"{typed}what differs?\n/quit\n"))
        capsys.readouterr()
        assert main(["chat", "--model", str(tiny_model_dir), *map(str, args), *map(str, GREEDY)]) == 0
        out = capsys.readouterr().out
        replies = [line.partition("mm> ")[2].strip() for line in out.splitlines() if "mm> " in line]
        assert replies == [answer], out
