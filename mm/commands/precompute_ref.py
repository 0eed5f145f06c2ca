"""``mm precompute-ref``: store the reference model's summed response log-probs in preference shards, for DPO
without a second model in memory.

    mm precompute-ref --model runs/lite/3_instruct IN_SHARDS OUT_DIR [--seq-len 512]

Every preference document of IN_SHARDS (a directory, glob or file) is copied to OUT_DIR/preference-NNNNNN.tar
with ``"ref_logp": {"chosen": float, "rejected": float}``; train with ``stage.loss.reference=precomputed``.
Other documents are skipped, and so are pairs the DPO loader would drop (too long, a bad image: counted on stderr).
Pairs are rendered with the model's image layout, as training renders them. Use the same ``data.seq_len`` as the
DPO run (truncation changes the sums).
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


def precompute(model_dir: str, shards: str, out: str | Path, seq_len: int = 512, progress: bool = True) -> int:
    """Write the annotated shards; returns the number of documents written. Each pair is rendered and batched as
    the DPO loader does (``Renderer.item``, ``collate_preference``: the model's image layout, truncation and feature
    order), so the stored sums are those the policy is compared with. A pair the loader would drop is skipped and
    counted on stderr."""
    import sys
    from collections import Counter

    import torch

    import mm
    from mm.data import Renderer, ShardWriter, iter_docs, list_shards
    from mm.data.bad import BadSample
    from mm.data.pack import collate_preference
    from mm.errors import MMError
    from mm.train.build import resolve_model_dir
    from mm.train.losses.dpo import pair_logps
    from mm.train.preflight import writable_dir

    if seq_len < 1:
        raise MMError(f"--seq-len must be at least 1, got {seq_len}")
    list_shards(shards)  # missing shards and an unwritable output fail before the model loads
    writable_dir(out, "the output directory", keep=False)
    model = mm.load(resolve_model_dir(model_dir))
    renderer = Renderer.from_model(model, seq_len)
    pad_id = model.tokenizer.pad_token_id
    pad_id = model.tokenizer.eos_token_id if pad_id is None else pad_id
    written, skipped = 0, Counter()
    docs = iter_docs(shards)
    if progress:
        from tqdm import tqdm

        docs = tqdm(docs, unit="doc", desc="ref logps")
    with ShardWriter(out, prefix="preference") as writer, torch.no_grad():
        for key, doc, images in docs:
            if doc.get("kind") != "preference":
                continue
            try:
                item = renderer.item(key, doc, images, "preference")
            except BadSample as exc:
                skipped[exc.reason] += 1
                continue
            chosen, rejected, _ = pair_logps(model, collate_preference([item], pad_id, renderer.transform))
            doc = {**doc, "ref_logp": {"chosen": float(chosen[0]), "rejected": float(rejected[0])}}
            writer.add(key, doc, images)
            written += 1
    if skipped:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
        print(f"skipped {sum(skipped.values())} preference documents the loader would drop: {reasons}",
              file=sys.stderr)
    return written


def run(args: argparse.Namespace) -> int:
    n = precompute(args.model, args.shards, args.out, args.seq_len)
    print(f"wrote {n} preference documents with ref_logp to {args.out}")
    return 0
