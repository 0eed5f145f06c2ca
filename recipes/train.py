#!/usr/bin/env python
"""Train one stage of a multimodal LLM with DeepSpeed: the ``mm train`` command, kept at this path for launchers.

    deepspeed recipes/train.py                                  # embedded default: synthetic corpus -> lite align
    deepspeed recipes/train.py --config recipes/lite/1_align.yaml [more.yaml] key=value ...
    python recipes/train.py --config recipes/tiny/1_align.yaml output_dir=runs/x trainer.max_steps=10

The code lives in ``mm/commands/train.py``; see ``mm train --help``.
"""
import sys

from mm.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
