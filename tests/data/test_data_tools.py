"""``mm inspect`` and ``mm make-synthetic`` as a user runs them (the ``mm`` entry point, in process)."""
from __future__ import annotations

import json

import webdataset as wds

from mm.cli import main

from mm.data import ShardWriter

from data_helpers import caption_doc, png, write_captions


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


def test_inspect_counts_a_tiling_models_tiles(tmp_path, capsys):
    """With ``--model`` of a tiling model, the lengths are the rows training renders (tiles and separators)."""
    import mm
    from mm.data import DataConfig, build_loader

    with ShardWriter(tmp_path / "shards", "wide") as writer:
        for i in range(6):  # 100 x 30 and 30 x 100: a 3 x 1 and a 1 x 3 grid of tiles, plus the thumbnail
            writer.add(f"wide{i}", caption_doc(f"doc {i}" + " red" * i), [png(size=(100, 30)[:: 1 - 2 * (i % 2)])])
    model = mm.build(mm.ModelConfig(layout={"name": "dynamic", "max_tiles": 4}))
    model.save(tmp_path / "model")
    assert main(["inspect", str(tmp_path / "shards"), "--json", "--model", str(tmp_path / "model")]) == 0
    tokens = json.loads(capsys.readouterr().out)["tokens"]
    data = DataConfig(train=str(tmp_path / "shards"), batch_size=6, seq_len=4096, pack=False, resample=False)
    lengths = next(iter(build_loader(data, model)))["attention_mask"].sum(1).tolist()
    assert (tokens["min"], tokens["max"]) == (min(lengths), max(lengths))
    assert tokens["min"] > 4 * model.tokens_per_image  # a 3 x 1 grid + thumbnail (+ separators) per image


def test_make_synthetic_cli(tmp_path, capsys):
    assert main(["make-synthetic", "--out", str(tmp_path / "s"), "--n", "5", "--n-val", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"train": 5, "val": 2}
    assert main(["make-synthetic", "--out", str(tmp_path / "s"), "--n", "0"]) == 2
    assert capsys.readouterr().err.startswith("mm: error:")
