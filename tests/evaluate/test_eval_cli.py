"""``mm eval`` end to end: a tiny saved model over shards written with webdataset's TarWriter (issue 7 format)."""
import io
import json

import pytest
import webdataset as wds
from PIL import Image

from mm.cli import main
from mm.evaluate import bleu, cider_d, vqa_accuracy


def png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def chat_doc(question, reply=None, **extra):
    messages = [{"role": "user", "content": [{"type": "image", "image": "0.png"}, {"type": "text", "text": question}]}]
    if reply is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})
    return {"kind": "chat", "lang": "en", "source": {"name": "test"}, "messages": messages, **extra}


def write_shard(path, docs, bad_image_key=None):
    with wds.TarWriter(str(path)) as sink:
        for i, doc in enumerate(docs):
            key = f"doc{i:03d}"
            image = b"not an image" if key == bad_image_key else png((40 * i % 256, 100, 200))
            sink.write({"__key__": key, "json": json.dumps(doc).encode(), "0.png": image})


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-shards")
    (root / "caption").mkdir()
    caption = [chat_doc("describe the image", "a red circle", references=["a red circle", "a small red shape"]),
               chat_doc("describe the image", "two blue squares"),
               {"kind": "interleaved", "lang": "en", "source": {},
                "content": [{"type": "image", "image": "0.png"}, {"type": "text", "text": "a green star"}]}]
    write_shard(root / "caption" / "shard-000000.tar", caption[:2])
    write_shard(root / "caption" / "shard-000001.tar", caption[2:] + [chat_doc("describe", "x")], "doc001")
    vqa = [chat_doc("how many circles?", "two", references=["2"] * 6 + ["3"] * 4),
           chat_doc("what colour?", "red"), chat_doc("is it big?", "yes")]
    write_shard(root / "vqa.tar", vqa)
    mc = [chat_doc("what colour is it?", options=["red", "blue", "green"], answer=i % 3,
                   dimension=["colour", "count"][i % 2]) for i in range(5)]
    write_shard(root / "mc.tar", mc)
    return root


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_predictions(out):
    path = out.with_name(out.stem + ".predictions.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_caption(tiny_model_dir, shards, tmp_path, capsys):
    out = tmp_path / "caption.json"
    code, stdout, _ = run_cli(["eval", "--model", str(tiny_model_dir), "--data", str(shards / "caption"),
                               "--task", "caption", "--batch-size", "2", "--max-new-tokens", "6", "--json",
                               "--out", str(out), "--no-progress"], capsys)
    assert code == 0
    metrics = json.loads(stdout)
    assert metrics == json.loads(out.read_text())
    assert metrics["n"] == 3 and metrics["skipped"] == {"corrupt_image": 1}  # shard 1, doc001: a broken image
    rows = read_predictions(out)
    assert [r["references"] for r in rows] == [["a red circle", "a small red shape"], ["two blue squares"], ["a green star"]]
    hyps, refs = [r["prediction"] for r in rows], [r["references"] for r in rows]
    assert metrics["bleu4"] == pytest.approx(bleu(hyps, refs)[3])
    assert metrics["cider"] == pytest.approx(cider_d(hyps, refs)[0])


def test_vqa_limit(tiny_model_dir, shards, tmp_path, capsys):
    out = tmp_path / "vqa.json"
    code, _, _ = run_cli(["eval", "--model", str(tiny_model_dir), "--data", str(shards / "vqa.tar"), "--task", "vqa",
                          "--limit", "2", "--max-new-tokens", "4", "--out", str(out), "--no-progress"], capsys)
    assert code == 0
    metrics = json.loads(out.read_text())
    rows = read_predictions(out)
    assert metrics["n"] == len(rows) == 2
    assert rows[0]["references"] == ["2"] * 6 + ["3"] * 4
    expected = sum(vqa_accuracy(r["prediction"], r["references"]) for r in rows) / 2
    assert metrics["accuracy"] == pytest.approx(expected)


def test_mc_per_dimension(tiny_model_dir, shards, tmp_path, capsys):
    out = tmp_path / "mc.json"
    code, stdout, _ = run_cli(["eval", "--model", str(tiny_model_dir), "--data", str(shards / "mc.tar"),
                               "--task", "mc", "--batch-size", "2", "--out", str(out), "--no-progress"], capsys)
    assert code == 0 and "accuracy" in stdout
    metrics = json.loads(out.read_text())
    rows = read_predictions(out)
    assert len(rows) == 5 and all(len(r["scores"]) == 3 for r in rows)
    for r in rows:  # the prediction is the most likely option
        assert r["prediction"] == max(range(3), key=r["scores"].__getitem__)
        assert r["correct"] == (r["prediction"] == r["answer"])
    dims = metrics["per_dimension"]
    assert {d: v["n"] for d, v in dims.items()} == {"colour": 3, "count": 2}
    for d, v in dims.items():
        hits = [r["correct"] for r in rows if r["dimension"] == d]
        assert v["accuracy"] == pytest.approx(sum(hits) / len(hits))
    assert metrics["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / 5)


@pytest.mark.parametrize("extra, message", [
    (["--task", "mc", "--limit", "0"], "--limit"),
    (["--task", "mc", "--data-missing"], None),
])
def test_bad_flags(tiny_model_dir, shards, tmp_path, capsys, extra, message):
    if message is None:
        with pytest.raises(SystemExit) as exc:
            main(["eval", "--model", str(tiny_model_dir), "--data", str(shards), *extra])
        assert exc.value.code == 2
        return
    code, _, err = run_cli(["eval", "--model", str(tiny_model_dir), "--data", str(shards / "mc.tar"),
                            "--out", str(tmp_path / "m.json"), *extra], capsys)
    assert code == 2 and err.startswith("mm: error:") and message in err and len(err.strip().splitlines()) == 1


def test_bad_data(tiny_model_dir, shards, tmp_path, capsys):
    base = ["eval", "--model", str(tiny_model_dir), "--out", str(tmp_path / "m.json"), "--no-progress"]
    code, _, err = run_cli(base + ["--data", str(tmp_path / "nothing"), "--task", "vqa"], capsys)
    assert code == 2 and "no shards found" in err
    code, _, err = run_cli(base + ["--data", str(shards / "vqa.tar"), "--task", "mc"], capsys)  # no options
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("mm: error: no evaluable documents in ") and "3 skipped: task_mismatch=3" in err
    assert "document doc000 of " in err and "task mc needs 'options'" in err


def test_bad_documents_are_reported_by_key_and_good_predictions_kept(tiny_model_dir, tmp_path, capsys):
    from mm.data import ShardWriter

    docs = {"good0": (chat_doc("what colour?", "red"), png((200, 0, 0))),
            "marker": (chat_doc("a literal <image> here: what colour?", "red"), png((0, 0, 200))),
            "broken": (chat_doc("what colour?", "blue"), b"not an image"),
            "good1": (chat_doc("how many?", "two"), png((0, 200, 0))),
            "noanswer": (chat_doc("what colour?"), png((0, 200, 200))),
            "good2": (chat_doc("is it big?", "yes"), png((90, 90, 90)))}
    with ShardWriter(tmp_path / "shards", "vqa", 100) as writer:
        for key, (doc, image) in docs.items():
            writer.add(key, doc, [image])
    shard = str(writer.written[0])
    out = tmp_path / "vqa.json"
    code, _, err = run_cli(["eval", "--model", str(tiny_model_dir), "--data", str(tmp_path / "shards"), "--task",
                            "vqa", "--batch-size", "2", "--max-new-tokens", "3", "--out", str(out), "--no-progress"],
                           capsys)
    assert code == 0, err
    assert [r["key"] for r in read_predictions(out)] == ["good0", "good1", "good2"]
    metrics = json.loads(out.read_text())
    assert metrics["n"] == 3
    assert metrics["skipped"] == {"image_mismatch": 1, "corrupt_image": 1, "task_mismatch": 1}
    assert sorted((d["key"], d["shard"], d["reason"]) for d in metrics["skipped_documents"]) == [
        ("broken", shard, "corrupt_image"), ("marker", shard, "image_mismatch"), ("noanswer", shard, "task_mismatch")]
    for key, reason in (("marker", "image_mismatch"), ("broken", "corrupt_image"), ("noanswer", "task_mismatch")):
        assert sum(line.startswith(f"mm: skipped {key} of {shard}: {reason}: ") for line in err.splitlines()) == 1
