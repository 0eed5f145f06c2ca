"""Bad samples: each kind is skipped before it reaches a batch, counted by reason with its shard and key, and logged
once per reason (then at the 10th, 100th, ...); too many end the run with MMError; a stream with no usable document
stops with one line saying why instead of hanging."""
from __future__ import annotations

import json
import logging
import struct
import threading
import zlib

import pytest
import torch
import webdataset as wds

from mm.data import DataConfig, ShardWriter, build_loader
from mm.data.bad import BadCounter, BadSample
from mm.errors import MMError

from data_helpers import caption_doc, chat_doc, png, write_captions

GOOD = 12


def _png_claiming(width: int, height: int) -> bytes:
    """A valid small PNG whose header claims a huge size (a decompression bomb for PIL's pixel limit)."""
    data = bytearray(png())
    ihdr = data[12:16] + struct.pack(">II", width, height) + data[24:29]
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def _jpeg_truncated() -> bytes:
    import io
    import random

    from PIL import Image
    noise = Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, format="JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def _sample(key, doc=None, image=None, raw_json=None):
    sample = {"__key__": key}
    sample["json"] = raw_json if raw_json is not None else json.dumps(doc or caption_doc("bad one")).encode()
    if image is not None:
        sample["0.png"] = image
    return sample


def _good(i):
    doc = caption_doc(f"doc {i}")
    doc["content"][0]["image"] = "0.png"
    return _sample(f"good{i:03d}", doc, png())


def _bad_doc():
    doc = caption_doc("bad one")
    doc["content"][0]["image"] = "0.png"
    return doc


CASES = {
    "corrupt_image": lambda n: _sample(f"bad{n}", _bad_doc(), b"this is not an image at all"),
    "truncated_image": lambda n: _sample(f"bad{n}", _bad_doc(), _jpeg_truncated()),
    "decompression_bomb": lambda n: _sample(f"bad{n}", _bad_doc(), _png_claiming(20000, 20000)),
    "zero_bytes": lambda n: _sample(f"bad{n}", _bad_doc(), b""),
    "missing_member": lambda n: _sample(f"bad{n}", _bad_doc(), None),
    "malformed_json": lambda n: _sample(f"bad{n}", raw_json=b'{"kind": "interleaved", "content": [', image=png()),
    "image_mismatch": lambda n: _sample(f"bad{n}", {**_bad_doc(), "content": _bad_doc()["content"] + [
        {"type": "text", "text": " and a literal <image> in the text"}]}, png()),
}


def _write(path, samples):
    with wds.TarWriter(str(path), encoder=False) as writer:
        for sample in samples:
            writer.write(sample)


def _run(tiny_model, directory, max_bad=0.5):
    data = DataConfig(train=str(directory), batch_size=2, seq_len=64, pack=False, resample=False,
                      shuffle_buffer=1, max_bad_fraction=max_bad)
    loader = build_loader(data, tiny_model)
    texts = []
    for batch in loader:
        for row in batch["input_ids"]:
            texts.append(tiny_model.tokenizer.decode([t for t in row.tolist() if t != tiny_model.image_token_id],
                                                     skip_special_tokens=True))
    return loader.counter, texts


@pytest.mark.parametrize("reason", sorted(CASES))
def test_bad_sample_is_skipped_counted_and_logged_once(tiny_model, tmp_path, caplog, reason):
    samples = [_good(i) for i in range(GOOD)]
    samples.insert(3, CASES[reason](1))
    samples.insert(8, CASES[reason](2))
    _write(tmp_path / "s-000000.tar", samples)
    with caplog.at_level(logging.WARNING, logger="mm.data"):
        counter, texts = _run(tiny_model, tmp_path)
    assert counter.bad == {reason: 2}
    assert counter.good == GOOD and sorted(texts) == sorted(f"doc {i}" for i in range(GOOD))
    assert [e["key"] for e in counter.examples[reason]] == ["bad1", "bad2"]
    assert all(e["shard"] == str(tmp_path / "s-000000.tar") for e in counter.examples[reason])
    logged = [r.getMessage() for r in caplog.records if reason in r.getMessage()]
    assert len(logged) == 1 and "bad1" in logged[0] and str(tmp_path / "s-000000.tar") in logged[0]


def test_truncated_tar_keeps_the_complete_samples_before_the_cut(tiny_model, tmp_path):
    _write(tmp_path / "s-000000.tar", [_good(i) for i in range(GOOD)])
    data = (tmp_path / "s-000000.tar").read_bytes()
    (tmp_path / "s-000000.tar").write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
    _write(tmp_path / "s-000001.tar", [_good(i) for i in range(GOOD, GOOD + 4)])
    counter, texts = _run(tiny_model, tmp_path)
    assert counter.bad == {"truncated_tar": 1}
    assert GOOD // 3 < len(texts) < GOOD + 4 and f"doc {GOOD + 3}" in texts and "doc 0" in texts
    assert len(set(texts)) == len(texts)


def test_too_many_bad_samples_end_the_run_with_a_clear_error(tiny_model, tmp_path):
    samples = [_good(i) for i in range(6)] + [CASES["corrupt_image"](n) for n in range(4)]
    _write(tmp_path / "s-000000.tar", samples)
    with pytest.raises(MMError, match=r"too many bad samples: 4 of 10 .*max_bad_fraction=0.2.*corrupt_image=4"):
        _run(tiny_model, tmp_path, max_bad=0.2)


# ----- dropped before the model: marker/image mismatch, too long ------------------------------------------------

def _planted(directory, good=10):
    """One shard, written with the project's ShardWriter: ``good`` caption docs ``doc <i>`` and, fourth, one whose
    text holds a literal ``<image>`` (two markers after rendering, one image)."""
    with ShardWriter(directory, "cap", 1000) as writer:
        for i in range(good):
            if i == 3:
                writer.add("planted", caption_doc("a red <image> circle"), [png()])
            writer.add(f"cap{i:05d}", caption_doc(f"doc {i} red circle"), [png((i * 40 % 255, 80, 120))])
    return str(writer.written[0])


def test_extra_image_marker_never_reaches_a_packed_batch(tiny_model, tmp_path):
    shard = _planted(tmp_path)
    data = DataConfig(train=str(tmp_path), batch_size=2, seq_len=96, shuffle_buffer=4, resample=False,
                      max_bad_fraction=0.2)
    loader = build_loader(data, tiny_model)
    batches = list(loader)
    for batch in batches:  # the model's splice contract holds for every batch
        placeholders = int((batch["input_ids"] == tiny_model.image_token_id).sum())
        assert placeholders == batch["pixel_values"].shape[0] * tiny_model.tokens_per_image
        tiny_model(**batch)
    assert loader.counter.bad == {"image_mismatch": 1} and loader.counter.good == 10
    assert loader.counter.examples["image_mismatch"][0]["key"] == "planted"
    assert loader.counter.examples["image_mismatch"][0]["shard"] == shard
    assert loader.metrics() == {"data/good": 10, "bad/image_mismatch": 1}


def test_counts_and_errors_of_dataloader_workers_reach_the_main_process(tiny_model, tmp_path):
    shard = _planted(tmp_path)
    data = DataConfig(train=str(tmp_path), batch_size=2, seq_len=96, pack=False, resample=False, num_workers=2,
                      max_bad_fraction=0.2)
    loader = build_loader(data, tiny_model)
    assert sum(len(b["input_ids"]) for b in loader) == 10
    assert loader.counter.bad == {"image_mismatch": 1} and loader.counter.good == 10
    assert loader.counter.examples["image_mismatch"][0] == {
        "shard": shard, "key": "planted", "detail": "2 <image> markers after rendering but 1 image(s) (a literal "
                                                    "<image> in its text?)"}
    short = DataConfig(train=str(tmp_path), batch_size=2, seq_len=8, resample=True, num_workers=2,
                       max_consecutive_skips=20, max_bad_fraction=1.0)
    with pytest.raises(MMError) as error:
        next(iter(build_loader(short, tiny_model)))
    assert str(error.value).startswith("no usable document in the last 20 candidates: ")
    assert "\n" not in str(error.value) and "Traceback" not in str(error.value)


def test_resume_past_a_dropped_document_reproduces_the_stream(tiny_model, tmp_path):
    _planted(tmp_path, good=20)
    data = DataConfig(train=str(tmp_path), batch_size=2, seq_len=96, shuffle_buffer=4, max_bad_fraction=0.5)
    full = [b for _, b in zip(range(8), build_loader(data, tiny_model))]
    resumed = [b for _, b in zip(range(4), build_loader(data, tiny_model, skip_batches=4))]
    for a, b in zip(full[4:], resumed):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])


def test_a_reason_is_logged_at_the_1st_10th_and_100th_document_only(caplog):
    counter = BadCounter()
    with caplog.at_level(logging.INFO, logger="mm.data"):
        for n in range(150):
            counter.record(BadSample("too_long", "120 tokens", key=f"k{n}", shard="s.tar"))
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 3 and "k0 of s.tar" in logged[0]
    assert logged[1].startswith("skipped 10 documents for too_long") and "k9" in logged[1]
    assert logged[2].startswith("skipped 100 documents for too_long") and "k99" in logged[2]
    assert counter.dropped == {"too_long": 150} and not counter.bad and len(counter.examples["too_long"]) == 5


# ----- no silent hang -----------------------------------------------------------------------------------------

def _first_batch_within(seconds, loader):
    """next(iter(loader)) in a thread: a regression to an endless search fails here instead of hanging the suite."""
    outcome = {}

    def target():
        try:
            outcome["batch"] = next(iter(loader))
        except Exception as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"the loader still searched after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["batch"]


@pytest.mark.parametrize("kind, seq_len, expected", [
    ("chat", 96, r"^no usable document in the last 1000 candidates: 1000 kind_mismatch \(the run reads chat "
                 r"documents, as stage.kind or the loss asks; these were 1000 interleaved\)$"),
    ("interleaved", 8, r"^no usable document in the last 1000 candidates: 1000 too_long \(e.g. document cap\d+ "
                       r"of .*cap-000000.tar: \d+ tokens; its first image does not fit in seq_len=8\)$"),
])
def test_stream_without_a_usable_document_stops_with_why(tiny_model, tmp_path, kind, seq_len, expected):
    write_captions(tmp_path, 6, shards=1)
    data = DataConfig(train=str(tmp_path), batch_size=2, seq_len=seq_len, shuffle_buffer=4)  # resampled forever
    with pytest.raises(MMError, match=expected):
        _first_batch_within(120, build_loader(data, tiny_model, kind=kind))


def test_all_bad_stream_is_stopped_by_the_consecutive_rule_before_the_bad_fraction(tiny_model, tmp_path):
    _write(tmp_path / "s-000000.tar", [CASES["corrupt_image"](n) for n in range(3)])
    data = DataConfig(train=str(tmp_path), batch_size=2, seq_len=64, shuffle_buffer=1, max_bad_fraction=1.0,
                      max_consecutive_skips=50)
    with pytest.raises(MMError, match=r"^no usable document in the last 50 candidates: 50 corrupt_image \(e.g. "
                                      r"document bad0 of .*s-000000.tar: cannot read image bad0.0"):
        _first_batch_within(60, build_loader(data, tiny_model))


def test_one_pass_without_a_usable_document_says_why(tiny_model, tmp_path):
    write_captions(tmp_path, 4, shards=1)
    data = DataConfig(train=str(tmp_path), batch_size=2, seq_len=96, resample=False)
    with pytest.raises(MMError, match=r"^no usable document in the 4 documents of the pass: 4 kind_mismatch \(e.g. "
                                      r"document cap0000\d of .*cap-000000.tar: kind interleaved; the run reads "
                                      r"preference\)$"):
        list(build_loader(data, tiny_model, kind="preference"))


def test_one_pass_where_one_worker_holds_nothing_usable_still_yields_the_other_workers_documents(tiny_model,
                                                                                               tmp_path):
    write_captions(tmp_path, 4, shards=1)
    with ShardWriter(tmp_path, "chat", 100) as writer:
        for i in range(4):
            writer.add(f"chat{i}", chat_doc(f"question {i}?", "red"), [png()])
    data = DataConfig(train=str(tmp_path), batch_size=2, seq_len=96, pack=False, resample=False, num_workers=2)
    loader = build_loader(data, tiny_model, kind="chat")  # two shards, two workers: one reads only captions
    assert sum(len(b["input_ids"]) for b in loader) == 4
    assert loader.counter.good == 4 and loader.counter.dropped == {"kind_mismatch": 4}


def test_reader_that_gets_no_sample_stops_instead_of_waiting_forever(tiny_model, tmp_path):
    write_captions(tmp_path, 2, shards=1)
    data = DataConfig(train=str(tmp_path), batch_size=1, seq_len=96, pack=False)
    with pytest.raises(MMError, match=r"has 2 samples, fewer than the 4 readers"):
        _first_batch_within(60, build_loader(data, tiny_model, rank=3, world_size=4))
