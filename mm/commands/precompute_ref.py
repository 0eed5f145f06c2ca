"""``mm precompute-ref``: store the reference model's summed response log-probs in preference shards, for DPO
without a second model in memory.

    mm precompute-ref --model runs/lite/3_instruct IN_SHARDS OUT_DIR [--seq-len 512]

Every preference document of IN_SHARDS (a directory, glob or file) is copied to OUT_DIR/preference-NNNNNN.tar
with ``"ref_logp": {"chosen": float, "rejected": float}``; train with ``stage.loss.reference=precomputed``.
Other documents are skipped. Use the same ``data.seq_len`` as the DPO run (truncation changes the sums).
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("precompute-ref", help="DPO reference log-probs into preference shards",
                                   description=__doc__)
    parser.add_argument("--model", required=True, help="the reference: an mm model dir or a finished run dir")
    parser.add_argument("shards", help="preference shards: directory, glob or file")
    parser.add_argument("out", help="output directory for the annotated shards")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.set_defaults(run=run)


def _batch(renderer, pad_id: int, rows, images) -> dict:
    """One pair as the chosen / rejected batches of ``pair_logps`` (each [1, T], right-padded to the longer)."""
    import torch

    width = max(len(r) for r in rows)

    def side(row):
        n = len(row)
        out = {"input_ids": torch.tensor([row.ids + [pad_id] * (width - n)]),
               "labels": torch.tensor([row.labels + [-100] * (width - n)]),
               "attention_mask": torch.tensor([[1] * n + [0] * (width - n)]),
               "position_ids": torch.arange(width)[None]}
        if images:
            out["pixel_values"] = renderer.pixels(images)
        return out

    return {"chosen": side(rows[0]), "rejected": side(rows[1])}


def precompute(model_dir: str, shards: str, out: str | Path, seq_len: int = 512, progress: bool = True) -> int:
    """Write the annotated shards; returns the number of documents written."""
    import torch

    import mm
    from mm.data import Renderer, ShardWriter, iter_docs
    from mm.train.build import resolve_model_dir
    from mm.train.losses.dpo import pair_logps

    from mm.data import list_shards
    from mm.errors import MMError
    from mm.train.preflight import writable_dir

    if seq_len < 1:
        raise MMError(f"--seq-len must be at least 1, got {seq_len}")
    list_shards(shards)  # missing shards and an unwritable output fail before the model loads
    writable_dir(out, "the output directory", keep=False)
    model = mm.load(resolve_model_dir(model_dir))
    renderer = Renderer.from_model(model, seq_len)
    pad_id = model.tokenizer.pad_token_id
    written = 0
    docs = iter_docs(shards)
    if progress:
        from tqdm import tqdm

        docs = tqdm(docs, unit="doc", desc="ref logps")
    with ShardWriter(out, prefix="preference") as writer, torch.no_grad():
        for key, doc, images in docs:
            if doc.get("kind") != "preference":
                continue
            rows = renderer.render_pair(doc)
            decoded = renderer.decode(images, key, rows[0].num_images)
            chosen, rejected, _ = pair_logps(model, _batch(renderer, pad_id, rows, decoded))
            doc = {**doc, "ref_logp": {"chosen": float(chosen[0]), "rejected": float(rejected[0])}}
            writer.add(key, doc, images)
            written += 1
    return written


def run(args: argparse.Namespace) -> int:
    n = precompute(args.model, args.shards, args.out, args.seq_len)
    print(f"wrote {n} preference documents with ref_logp to {args.out}")
    return 0
