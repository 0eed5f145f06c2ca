"""Bad samples: each kind is skipped, counted by reason and logged once; too many end the run with MMError."""
from __future__ import annotations

import json
import logging
import struct
import zlib

import pytest
import webdataset as wds

from mm.data import DataConfig, build_loader
from mm.errors import MMError

from data_helpers import caption_doc, png

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
    assert sum(reason in r.getMessage() for r in caplog.records) == 1


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
