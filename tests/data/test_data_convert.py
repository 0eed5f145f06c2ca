"""Converters round-trip: what goes in comes back out of the shards (``mm convert``, a real local HTTP server)."""
from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq

from mm.cli import main, parser
from mm.commands.convert import write_shards
from mm.data import iter_docs

from data_helpers import png


def _convert(*argv) -> dict:
    """The stats of ``mm convert ARGV --quiet``."""
    return write_shards(parser().parse_args(["convert", *map(str, argv), "--quiet"]))


def test_llava_multi_image_and_implicit_marker(tmp_path):
    images = tmp_path / "img"
    (images / "sub").mkdir(parents=True)
    a, b, c = png((255, 0, 0)), png((0, 255, 0), fmt="JPEG"), png((0, 0, 255))
    (images / "a.png").write_bytes(a)
    (images / "sub" / "b.jpg").write_bytes(b)
    (images / "c.png").write_bytes(c)
    records = [
        {"id": "one", "image": ["a.png", "sub/b.jpg"], "conversations": [
            {"from": "human", "value": "<image>\nCompare <image> please."}, {"from": "gpt", "value": "Red, green."},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "two", "image": "c.png", "conversations": [
            {"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "Blue."}]},
        {"id": "three", "image": "missing.png", "conversations": [{"from": "human", "value": "<image>"}]},
        {"id": "four", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(records))
    stats = _convert("llava", tmp_path / "llava.json", "--images", images, "--out", tmp_path / "out")
    assert stats["written"] == 3 and stats["dropped"] == {"missing_image": 1}
    docs = list(iter_docs(tmp_path / "out"))
    key, doc, imgs = docs[0]
    assert doc["kind"] == "chat" and imgs == [a, b]
    assert doc["messages"][0]["content"] == [
        {"type": "image", "image": "0.png"}, {"type": "text", "text": "\nCompare "},
        {"type": "image", "image": "1.jpg"}, {"type": "text", "text": " please."}]
    assert [m["role"] for m in doc["messages"]] == ["user", "assistant", "user", "assistant"]
    assert docs[1][1]["messages"][0]["content"][0] == {"type": "image", "image": "0.png"} and docs[1][2] == [c]
    assert docs[2][2] == [] and docs[2][1]["messages"][1]["content"] == [{"type": "text", "text": "Hello."}]


def test_captions_local_csv_and_parquet_urls(tmp_path, http_server):
    (tmp_path / "x.png").write_bytes(png((1, 2, 3)))
    (tmp_path / "caps.csv").write_text("image,caption\nx.png,a dark square\nnope.png,gone\n")
    stats = _convert("captions", tmp_path / "caps.csv", "--out", tmp_path / "o1", "--samples-per-shard", 1)
    assert stats["written"] == 1 and stats["dropped"] == {"missing_image": 1}
    (_, doc, imgs), = iter_docs(tmp_path / "o1")
    assert doc["content"][1]["text"] == "a dark square" and imgs == [png((1, 2, 3))]

    http_server.routes["/ok.png"] = (200, png((9, 9, 9)))
    table = pa.table({"url": [f"{http_server.base}/ok.png", f"{http_server.base}/404.png"],
                      "caption": ["grey", "missing"]})
    pq.write_table(table, tmp_path / "caps.parquet")
    stats = _convert("captions", tmp_path / "caps.parquet", "--download", "--retries", "0", "--out", tmp_path / "o2",
                     "--allow-private-addresses")  # the test server is on loopback, refused by default
    assert stats["written"] == 1 and stats["dropped"] == {"download_http_error": 1}
    (_, doc, imgs), = iter_docs(tmp_path / "o2")
    assert doc["content"][1]["text"] == "grey" and imgs == [png((9, 9, 9))]


def test_preference_jsonl(tmp_path):
    (tmp_path / "q.png").write_bytes(png())
    rows = [{"id": "p1", "image": "q.png", "question": "Color?", "chosen": "red", "rejected": "blue",
             "ref_logp": {"chosen": -1.5, "rejected": -3.0}},
            {"image": "q.png", "question": "<image> Shape?", "chosen": "a square", "rejected": "a circle"},
            {"image": "q.png", "question": "No answers"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = _convert("preference", tmp_path / "p.jsonl", "--images", tmp_path, "--out", tmp_path / "out")
    assert stats["written"] == 2 and stats["dropped"] == {"malformed_entry": 1}
    docs = [d for _, d, _ in iter_docs(tmp_path / "out")]
    assert docs[0]["chosen"] == "red" and docs[0]["rejected"] == "blue" and docs[0]["ref_logp"]["chosen"] == -1.5
    assert docs[1]["messages"][0]["content"][:2] == [{"type": "image", "image": "0.png"},
                                                      {"type": "text", "text": " Shape?"}]


def _moscar_table(base, images, metadata_as_struct):
    """Doc 0: index gaps + one failed image; doc 1: only a failed image (dropped); doc 2: text only."""
    sha = {name: hashlib.sha512(data).hexdigest() for name, data in images.items()}
    docs = [
        {"images": [{"img_idx": "#000002", "sha512": sha["a"], "url": f"{base}/a.png"},
                    {"img_idx": "#000005", "sha512": sha["b"], "url": f"{base}/missing.png"},
                    {"img_idx": "#000007", "sha512": sha["c"], "url": f"{base}/c.png"}],
         "text": [{"text": "first", "text_idx": "#000000"}, {"text": "third", "text_idx": "#000003"},
                  {"text": "last", "text_idx": "#000009"}],
         "order": "txt_#000000|img_#000002|txt_#000003|img_#000005|img_#000007|txt_#000009", "url": "u0"},
        {"images": [{"img_idx": "#000001", "sha512": sha["b"], "url": f"{base}/missing.png"}],
         "text": [{"text": "lonely", "text_idx": "#000000"}], "order": "img_#000001|txt_#000000", "url": "u1"},
        {"images": [], "text": [{"text": "just text", "text_idx": "#000004"}], "order": "txt_#000004", "url": "u2"},
    ]
    meta = [({"node_order": d["order"], "url": d["url"]} if metadata_as_struct
             else [{"node_order": d["order"], "url": d["url"]}]) for d in docs]
    return pa.table({"images": [d["images"] for d in docs], "text": [d["text"] for d in docs], "metadata": meta})


def _check_moscar(out):
    docs = [(d, imgs) for _, d, imgs in iter_docs(out)]
    assert len(docs) == 2
    (doc, imgs), (text_only, _) = docs
    kinds = [(p["type"], p.get("text")) for p in doc["content"]]
    assert kinds == [("text", "first"), ("image", None), ("text", "\nthird"), ("image", None), ("text", "\nlast")]
    assert imgs == [png((1, 0, 0)), png((3, 0, 0))]
    assert text_only["content"] == [{"type": "text", "text": "just text"}] and doc["lang"] == "eng_Latn"


def test_moscar_download_gaps_failures_and_resume(tmp_path, http_server):
    images = {"a": png((1, 0, 0)), "b": png((2, 0, 0)), "c": png((3, 0, 0))}
    def c_after_one_failure(hit):
        return (503, b"busy") if hit == 1 else (200, images["c"])

    http_server.routes["/a.png"] = (200, images["a"])
    http_server.routes["/c.png"] = (200, c_after_one_failure)
    src = tmp_path / "eng_Latn"
    src.mkdir()
    pq.write_table(_moscar_table(http_server.base, images, metadata_as_struct=False), src / "00000.parquet")
    out = tmp_path / "out"
    stats = _convert("moscar", src / "00000.parquet", "--download", "--workers", "4", "--timeout", "5",
                     "--samples-per-shard", "2", "--out", out, "--allow-private-addresses")
    assert stats["written"] == 2 and stats["dropped_all_images_failed"] == 1 and stats["partial_docs"] == 1
    assert stats["image_failures"] == {"http_error": 2}  # /missing.png (404) in doc 0 and doc 1
    assert http_server.hits["/c.png"] == 2  # retried after the 503
    _check_moscar(out)
    assert not list(out.glob("*.tmp"))
    # resume: finished blocks are skipped (no new requests); an unfinished block is redone
    (out / "00000-000001.done.json").unlink()
    hits = dict(http_server.hits)
    stats = _convert("moscar", src / "00000.parquet", "--download", "--samples-per-shard", "2", "--out", out,
                     "--allow-private-addresses")
    assert stats["blocks_skipped"] == 1 and stats["written"] == 2
    assert http_server.hits["/a.png"] == hits["/a.png"]  # block 0 not fetched again
    _check_moscar(out)


def test_moscar_mirror_struct_metadata_and_sha_check(tmp_path):
    images = {"a": png((1, 0, 0)), "b": png((2, 0, 0)), "c": png((3, 0, 0))}
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name in ("a", "c"):
        (mirror / (hashlib.sha512(images[name]).hexdigest() + ".png")).write_bytes(images[name])
    src = tmp_path / "eng_Latn"
    src.mkdir()
    pq.write_table(_moscar_table("http://127.0.0.1:9", images, metadata_as_struct=True), src / "x.parquet")
    stats = _convert("moscar", src / "x.parquet", "--images", mirror, "--out", tmp_path / "out")
    assert stats["written"] == 2 and stats["image_failures"] == {"not_in_mirror": 2}
    _check_moscar(tmp_path / "out")


def test_download_sha_mismatch_size_cap_and_timeout(http_server):
    from mm.data.download import Fetcher

    http_server.routes["/x.png"] = (200, png())
    http_server.routes["/big.png"] = (200, png(size=(400, 400)))
    good = hashlib.sha512(png()).hexdigest()
    fetcher = Fetcher(timeout=2, max_bytes=1000, retries=0, workers=3, allow_private=True)
    results = fetcher.fetch_all([(f"{http_server.base}/x.png", good), (f"{http_server.base}/x.png", "0" * 128),
                                 (f"{http_server.base}/big.png", None), ("http://127.0.0.1:1/none.png", None)])
    assert results[0] == png()
    assert [r.reason for r in results[1:]] == ["sha512_mismatch", "too_large", "unreachable"]


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    code = main(["convert", "llava", str(tmp_path / "no.json"), "--images", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("mm: error: input not found") and len(err.strip().splitlines()) == 1
    (tmp_path / "x.parquet").write_bytes(b"")
    assert main(["convert", "moscar", str(tmp_path / "x.parquet"), "--out", str(tmp_path / "o")]) == 2
    assert "exactly one of --images" in capsys.readouterr().err
