"""Datasets as they come: a LLaVA JSON by path and names from data/datasets.yaml become shards, converted once into
the cache (``mm.data.datasets``); what the loader reads equals what ``mm convert`` writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mm.cli import parser
from mm.commands.convert import write_shards
from mm.data import iter_docs, list_shards
from mm.data.datasets import load_registry, resolve_source
from mm.errors import MMError

from data_helpers import png

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Each test: its own conversion cache and registry, the working directory its tmp_path."""
    monkeypatch.setenv("MM_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MM_DATASETS", raising=False)
    monkeypatch.chdir(tmp_path)


def llava_folder(root: Path) -> Path:
    """``root/llava.json`` with three usable records and one whose image is missing; images under ``root/img``."""
    (root / "img" / "sub").mkdir(parents=True)
    (root / "img" / "a.png").write_bytes(png((255, 0, 0)))
    (root / "img" / "sub" / "b.jpg").write_bytes(png((0, 255, 0), fmt="JPEG"))
    records = [
        {"id": "one", "image": "img/a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "two", "image": ["img/a.png", "img/sub/b.jpg"], "conversations": [
            {"from": "human", "value": "Compare <image> and <image>."}, {"from": "gpt", "value": "Red, green."}]},
        {"id": "three", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "four", "image": "img/missing.png", "conversations": [{"from": "human", "value": "<image>"}]},
    ]
    (root / "llava.json").write_text(json.dumps(records))
    return root / "llava.json"


def docs_of(spec) -> list:
    return [(doc, images) for _, doc, images in iter_docs(spec)]


def test_a_llava_json_by_path_reads_as_mm_convert_writes_it(tmp_path):
    source = llava_folder(tmp_path / "mine")
    stats = write_shards(parser().parse_args(["convert", "llava", str(source), "--images", str(source.parent),
                                              "--out", str(tmp_path / "converted"), "--quiet"]))
    assert stats["written"] == 3 and stats["dropped"] == {"missing_image": 1}

    shards = list_shards(str(source))
    folder = Path(shards[0]).parent
    assert folder.parent == tmp_path / "cache" and (folder / "complete").is_file()
    assert json.loads((folder / "stats.json").read_text())["dropped"] == {"missing_image": 1}
    assert docs_of(str(source)) == docs_of(tmp_path / "converted")


def test_conversion_happens_once_and_again_when_the_file_changes(tmp_path):
    source = llava_folder(tmp_path)
    first = list_shards(str(source))
    (tmp_path / "img" / "sub" / "b.jpg").unlink()  # a second conversion would drop record "two"
    assert list_shards(str(source)) == first and len(docs_of(str(source))) == 3

    source.write_text(json.dumps(json.loads(source.read_text())[:1] * 2))
    os.utime(source, ns=(0, 10**18))  # a modification time no earlier write shares
    again = list_shards(str(source))
    assert Path(again[0]).parent != Path(first[0]).parent and len(docs_of(str(source))) == 2


def test_registry_names_every_format_with_paths_relative_to_the_registry(tmp_path):
    data = tmp_path / "data"
    llava_folder(data / "llava")
    (data / "caps").mkdir()
    (data / "caps" / "x.png").write_bytes(png((10, 20, 30)))
    pq.write_table(pa.table({"file": ["x.png", "gone.png"], "caption": ["a dark square", "nothing"]}),
                   data / "caps" / "captions.parquet")
    (data / "pairs.jsonl").write_text(json.dumps(
        {"image": "caps/x.png", "question": "Colour?", "chosen": "Dark.", "rejected": "Pink."}) + "\n")
    shard_dir = tmp_path / "converted"
    write_shards(parser().parse_args(["convert", "llava", str(data / "llava" / "llava.json"), "--images",
                                      str(data / "llava"), "--out", str(shard_dir), "--quiet"]))
    (data / "datasets.yaml").write_text(
        "mix:\n  llava: llava/llava.json\n  lang: de\n"
        "caps:\n  captions: caps/captions.parquet\n  image_col: file\n"
        "prefs:\n  preference: pairs.jsonl\n  images: .\n"
        f"ready:\n  shards: {shard_dir}\n")

    assert sorted(load_registry(data / "datasets.yaml")) == ["caps", "mix", "prefs", "ready"]
    mix = docs_of("mix")
    assert len(mix) == 3 and {doc["lang"] for doc, _ in mix} == {"de"}
    assert [doc["kind"] for doc, _ in docs_of("caps")] == ["interleaved"]
    (prefs,) = docs_of("prefs")
    assert prefs[0]["kind"] == "preference" and prefs[1] == [(data / "caps" / "x.png").read_bytes()]
    assert resolve_source("ready") == str(shard_dir) and docs_of("ready") == docs_of(shard_dir)


@pytest.mark.parametrize("entry, message", [
    ("x:\n  llava: missing.json\n", "llava file not found"),
    ("x:\n  llava: llava/llava.json\n  shards: somewhere\n", "give exactly one of llava, captions"),
    ("x:\n  llava: llava/llava.json\n  image_root: llava\n", "unknown keys ['image_root']"),
    ("x:\n  llava: llava/llava.json\n  images: nowhere\n", "image root not found"),
    ("x: llava/llava.json\n", "expected a mapping"),
    ("x:\n  llava: [a, b]\n", "every value is a string"),
    ("- x\n", "must map dataset names to entries"),
    ("x: [\n", "cannot be read"),
])
def test_a_malformed_registry_entry_is_one_line(tmp_path, entry, message):
    llava_folder(tmp_path / "data" / "llava")
    (tmp_path / "data" / "datasets.yaml").write_text(entry)
    with pytest.raises(MMError, match="data/datasets.yaml") as error:
        list_shards("x")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_an_unknown_name_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("MM_DATASETS", str(tmp_path / "elsewhere.yaml"))
    with pytest.raises(MMError, match=r"no shards found at 'nothing'.*dataset named in .*elsewhere.yaml"):
        list_shards("nothing")


def test_nothing_convertible_is_an_error_and_leaves_no_cache(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps([{"id": 1, "image": "../../etc/passwd",
                                                    "conversations": [{"from": "human", "value": "<image>"}]}]))
    with pytest.raises(MMError, match=r"no entry of .*bad.json could be converted .*image_outside_root"):
        list_shards(str(tmp_path / "bad.json"))
    assert not list((tmp_path / "cache").iterdir()) or all(p.suffix == ".lock"
                                                           for p in (tmp_path / "cache").iterdir())


def test_processes_resolving_at_once_convert_once(tmp_path):
    """Every rank of a run resolves the same source at start: one converts under the lock, the others reuse it."""
    source = llava_folder(tmp_path)
    code = "import sys; from mm.data import list_shards; print(list_shards(sys.argv[1]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    children = [subprocess.Popen([sys.executable, "-c", code, str(source)], env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    results = [child.communicate(timeout=600) for child in children]
    assert all(child.returncode == 0 for child in children), results
    assert len({out for out, _ in results}) == 1
    assert sum(err.count("converting") for _, err in results) == 1
