"""Write a stand-in of a transformers LLM directory: the same config and tokenizer files, random weights.

    python -m tools.bench.stand_in_llm --like DIR_WITH_CONFIG_AND_TOKENIZER --out DIR [--seed 0]

For speed benchmarks on a machine that cannot fetch the real weights (a bare GPU machine with no hub access):
the cost of a forward pass depends on the shapes and dtypes, never on the values. ``--like`` needs
``config.json`` and the tokenizer files only (a few MB, unlike the weights). The output holds a ``STAND_IN``
marker file, which ``tools.bench.generate`` reports; nothing else reads it. Refuses to write into a directory
that already holds weights.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

MARKER = "STAND_IN"
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
          "special_tokens_map.json", "vocab.json", "merges.txt")


def write_stand_in(like: Path, out: Path, seed: int = 0) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(like)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for name in COPIED:
        if (like / name).is_file() and name != "config.json":
            shutil.copy(like / name, out / name)
    (out / MARKER).write_text(f"random weights (seed {seed}) with the config and tokenizer of {like}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--like", required=True, type=Path, help="directory with config.json and tokenizer files")
    parser.add_argument("--out", required=True, type=Path, help="directory to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from mm.errors import MMError, report

    if not (args.like / "config.json").is_file():
        return report(MMError(f"{args.like / 'config.json'} not found"))
    if any(args.out.glob("*.safetensors")) and not (args.out / MARKER).exists():
        return report(MMError(f"{args.out} already holds real weights; choose another --out"))
    write_stand_in(args.like, args.out, args.seed)
    print(f"stand-in written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
