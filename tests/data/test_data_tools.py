"""``mm inspect`` and ``mm make-synthetic`` as a user runs them (the ``mm`` entry point, in process)."""
from __future__ import annotations

import json

import webdataset as wds

from mm.cli import main

from data_helpers import write_captions


def test_inspect_counts_lengths_and_bad_samples(tmp_path, capsys):
    write_captions(tmp_path, 6, shards=1)
    with wds.TarWriter(str(tmp_path / "bad-000000.tar"), encoder=False) as writer:
        writer.write({"__key__": "broken", "json": b"{oops"})
    assert main(["inspect", str(tmp_path), "--json", "--tokens-per-image", "10"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["documents"] == 6 and summary["kinds"] == {"interleaved": 6}
    assert summary["images_per_doc"] == {"1": 6} and summary["bad"] == {"malformed_json": 1}
    assert sum(summary["tokens"]["histogram"].values()) == 6 and summary["tokens"]["min"] > 10
    assert main(["inspect", str(tmp_path)]) == 0
    assert "malformed_json=1" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("mm: error: no shards found")


def test_make_synthetic_cli(tmp_path, capsys):
    assert main(["make-synthetic", "--out", str(tmp_path / "s"), "--n", "5", "--n-val", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"train": 5, "val": 2}
    assert main(["make-synthetic", "--out", str(tmp_path / "s"), "--n", "0"]) == 2
    assert capsys.readouterr().err.startswith("mm: error:")
