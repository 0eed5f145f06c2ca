"""The ``wide-words`` synthetic corpus: small words on 4:1 canvases, answers that are the drawn word, a manifest
that records the choice, and a default corpus the option leaves as it was."""
from __future__ import annotations

import json
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from mm.cli import main
from mm.data import iter_docs, make_synthetic
from mm.data.synthetic import QUESTIONS, WIDE, WIDE_FONT, WORDS
from mm.images import open_image


def ink_box(image: Image.Image) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of the pixels that are not white."""
    dark = np.asarray(image.convert("L")) < 250
    rows, cols = np.nonzero(dark.any(axis=1))[0], np.nonzero(dark.any(axis=0))[0]
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def read_word(image: Image.Image) -> str:
    """Template matching against every vocabulary word drawn in the corpus's font: the closest ink crop."""
    left, top, right, bottom = ink_box(image)
    crop = np.asarray(image.convert("L").crop((left, top, right, bottom)), dtype=float)
    scores = {}
    for word in WORDS:
        canvas = Image.new("L", (100, 40), 255)
        ImageDraw.Draw(canvas).text((10, 10), word, fill=0, font=ImageFont.load_default(size=WIDE_FONT))
        template = canvas.crop(ink_box(canvas.convert("RGB")))
        if abs(template.width - crop.shape[1]) > 2 or abs(template.height - crop.shape[0]) > 2:
            scores[word] = float("inf")
            continue
        resized = np.asarray(template.resize((crop.shape[1], crop.shape[0])), dtype=float)
        scores[word] = float(np.abs(resized - crop).mean())
    return min(scores, key=scores.get)


def members(directory) -> dict[str, bytes]:
    """Every member's bytes of every shard under ``directory`` (tar headers carry write times, members do not)."""
    out = {}
    for shard in sorted(directory.rglob("*.tar")):
        with tarfile.open(shard) as tar:
            for info in tar.getmembers():
                out[f"{shard.relative_to(directory)}/{info.name}"] = tar.extractfile(info).read()
    return out


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("wide") / "syn", n=24, n_val=12, seed=5, scenes="wide-words")


def test_wide_words_are_small_words_on_wide_images_and_the_answer_is_the_drawn_word(wide):
    qa = [json.loads(line) for line in (wide / "val" / "qa.jsonl").read_text().splitlines()]
    assert len(qa) == 12 and {row["type"] for row in qa} == {"word"}
    lefts = []
    for row in qa:
        assert row["question"] == QUESTIONS["word"][0] and row["answer"] in QUESTIONS["word"][1]
        image = open_image(wide / "val" / row["image"])
        assert image.size == WIDE and image.width == 4 * image.height
        left, top, right, bottom = ink_box(image)
        assert 0 < left and right < image.width and 0 < top and bottom < image.height  # wholly inside
        assert right - left < image.width / 8 and bottom - top < image.height / 5  # small type
        assert read_word(image) == row["answer"]
        lefts.append(left)
    assert max(lefts) - min(lefts) > image.width / 3  # words move across the canvas, not always centred
    for _, doc, images in iter_docs(wide / "train"):
        sizes = {open_image(data).size for data in images}
        assert sizes == {WIDE}
        if doc["kind"] == "interleaved":  # the captions name the drawn word
            text = "".join(part.get("text", "") for part in doc["content"])
            assert text.count("the word ") == len(images)
        if doc["kind"] == "chat":
            assert doc["messages"][1]["content"][0]["text"] in WORDS


def test_the_manifest_records_the_scenes_and_a_mixed_corpus_is_not_reused(wide, tmp_path):
    manifest = json.loads((wide / "manifest.json").read_text())
    assert manifest["params"]["scenes"] == "wide-words" and manifest["answers"]["word"] == list(WORDS)
    out = make_synthetic(tmp_path / "syn", n=6, n_val=2, seed=5)
    assert "scenes" not in json.loads((out / "manifest.json").read_text())["params"]
    make_synthetic(out, n=6, n_val=2, seed=5, scenes="wide-words")  # same dir, other scenes: regenerated
    assert {open_image(out / "val" / "images" / "00000.png").size} == {WIDE}
    with pytest.raises(ValueError, match="wide-words"):
        make_synthetic(tmp_path / "bad", n=2, scenes="tall")


def test_the_default_corpus_is_unchanged_by_the_option(tmp_path):
    default = make_synthetic(tmp_path / "default", n=40, n_val=10, seed=2)
    mixed = make_synthetic(tmp_path / "mixed", n=40, n_val=10, seed=2, scenes="mixed")
    assert members(default) == members(mixed)
    manifest = json.loads((default / "manifest.json").read_text())
    assert manifest["params"] == {"version": 1, "n": 40, "n_val": 10, "seed": 2}  # what corpora always recorded
    qa = [json.loads(line) for line in (default / "val" / "qa.jsonl").read_text().splitlines()]
    assert {open_image(default / "val" / row["image"]).size for row in qa} == {(96, 96)}
    assert Counter(row["type"] for row in qa).keys() >= {"color", "shape", "count", "side"}
    for row in qa:
        if row["type"] == "word":  # a default word is large and centred
            left, top, right, bottom = ink_box(open_image(default / "val" / row["image"]))
            assert right - left > 40 and abs((left + right) / 2 - 48) < 4


def test_make_synthetic_cli_scenes(tmp_path, capsys):
    assert main(["make-synthetic", "--out", str(tmp_path / "s"), "--n", "3", "--n-val", "2",
                 "--scenes", "wide-words"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"train": 3, "val": 2}
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["params"]["scenes"] == "wide-words"
    with pytest.raises(SystemExit):
        main(["make-synthetic", "--out", str(tmp_path / "t"), "--scenes", "tall"])
