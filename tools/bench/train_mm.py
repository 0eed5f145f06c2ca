"""Training throughput and MFU through ``mm.train`` itself: the DeepSpeed engine (ZeRO-2, bf16 on a GPU), the
streaming loader over real JPEG WebDataset shards with packing, a Qwen2-0.5B-shaped LLM and a CLIP ViT-L/14
tower at 336 px, both with random weights written from configs (nothing is downloaded).

    python -m tools.bench.train_mm --size 0.5b --device cuda      # one GPU, one command
    python -m tools.bench.train_mm --size tiny --device cpu       # the same code in seconds (tests)

The stage: adapter (``mlp``) + the whole LLM train, the tower is frozen (``select_layer -2``, LLaVA's); every
document is one image then text, all text labelled (the ``interleaved`` kind); rows of ``seq_len`` tokens packed
from several documents (8,192 on 0.5b). ``train()`` runs in this process with ``trainer.log_every=1``; its
batches come from ``mm.data.build_loader`` (the loop's own loader, built over a meta-device copy of the model) and
are counted as the loop takes them, so each step's tokens, labelled positions, images and document lengths are
known exactly. Each step's seconds are its tokens over the ``tokens_per_s`` the loop wrote to ``metrics.jsonl``
(the whole step: data, forward, backward, optimizer); the first ``warmup`` steps are not measured.

FLOPs of a step (model FLOPs: what the model needs, not what it recomputes or pads):
- LLM: ``6 * N_body * tokens + 6 * N_head * labelled``: the LM head runs only where a label is (``lm`` loss);
  ``N_body`` = the decoder (no embedding, no head), ``N_head`` = vocabulary x width (the tied embedding, once).
  ``llm_mfu_6n`` gives the usual ``6 * N * tokens`` (head at every token, as ``tools.bench.train_gpu``).
- attention: not in ``mfu``; ``mfu_with_attention`` adds ``6 * layers * width * sum(L^2)`` over the packed
  documents (causal, within a document, forward + backward).
- adapter: ``6 * N_adapter`` per image token; tower: forward only (frozen, no graph), ``2 * N_tower`` per tower
  token (patches + CLS) plus its attention, ``4 * layers * width * T^2`` per image; reported apart
  (``tower_flops_per_step``, ``tower_share``) and counted in ``mfu``.
``mfu`` = all of these but attention per second over the matmul peak measured in this process (bf16 8192^3 on a
GPU, fp32 512^3 on CPU); ``gpu_train_mfu`` = ``mfu`` on CUDA, ``"n/a"`` on CPU. Peak memory:
``torch.cuda.max_memory_allocated`` over the run on CUDA, the process's peak resident set on CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import resource
import shutil
import socket
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mm.errors import MMError


@dataclass(frozen=True)
class Size:
    llm: dict  # transformers Qwen2Config fields
    tower: dict  # transformers CLIPVisionConfig fields
    seq_len: int  # tokens per packed row
    batch_size: int  # rows per step
    words: tuple[int, int]  # text words per document (uniform)
    documents: int  # in the shards (the loader resamples them)
    shards: int
    num_workers: int  # loader processes (0: in the training process)
    warmup: int  # steps not measured
    steps: int  # measured steps


SIZES = {
    "0.5b": Size(llm=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                          num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                          rope_theta=1e6, tie_word_embeddings=True),
                 tower=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            projection_dim=768, image_size=336, patch_size=14),
                 seq_len=8192, batch_size=2, words=(200, 1400), documents=512, shards=16, num_workers=8,
                 warmup=3, steps=10),
    "tiny": Size(llm=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=1088, max_position_embeddings=2048,
                          tie_word_embeddings=True),
                 tower=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8),
                 seq_len=256, batch_size=2, words=(10, 60), documents=48, shards=2, num_workers=0,
                 warmup=1, steps=2),
}

WORDS = ("the a of and to in is it that on with as for this was are by at from image picture shows left right "
         "top bottom red green blue yellow small large circle square one two three four five six seven eight nine "
         "ten there here what which many how colour shape above below next near far word text").split()


# ----- inputs: model directories and shards ---------------------------------------------------------------------
def write_models(size: Size, workdir: Path) -> tuple[Path, Path]:
    """A random Qwen2 causal LM (with the tiny test tokenizer) and a random CLIP vision tower, saved as ``hf:``
    directories under ``workdir``; kept when ``workdir`` already holds them for ``size``."""
    from transformers import AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel, Qwen2Config

    from mm.llm.tiny import build_tiny

    llm_dir, tower_dir = workdir / "llm", workdir / "tower"
    stamp = workdir / "models.json"
    wanted = json.dumps({"llm": size.llm, "tower": size.tower}, sort_keys=True)
    if stamp.is_file() and stamp.read_text() == wanted:
        return llm_dir, tower_dir
    _, tokenizer = build_tiny("qwen2")  # a real byte-level BPE with a ChatML template, vocabulary 1,024
    assert len(tokenizer) < size.llm["vocab_size"], "the LLM's vocabulary must hold the tokenizer and <image>"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        llm = AutoModelForCausalLM.from_config(Qwen2Config(**size.llm, pad_token_id=tokenizer.pad_token_id,
                                                           eos_token_id=tokenizer.eos_token_id, bos_token_id=None),
                                               dtype=torch.float32)
        llm.save_pretrained(llm_dir)
        tokenizer.save_pretrained(llm_dir)
        del llm
        CLIPVisionModel(CLIPVisionConfig(**size.tower)).save_pretrained(tower_dir)
    stamp.write_text(wanted)
    return llm_dir, tower_dir


def jpeg(rng: random.Random, side: int) -> bytes:
    """A ``side`` x ``side`` JPEG of a few coloured shapes on a coloured ground (quality 90)."""
    from PIL import Image, ImageDraw

    colour = lambda: tuple(rng.randrange(256) for _ in range(3))  # noqa: E731
    image = Image.new("RGB", (side, side), colour())
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(2, 6)):
        x, y = sorted(rng.randrange(side) for _ in range(2)), sorted(rng.randrange(side) for _ in range(2))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x[0], y[0], x[1] + 1, y[1] + 1), fill=colour())
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_shards(size: Size, directory: Path, side: int, seed: int = 0) -> Path:
    """``size.documents`` interleaved documents (a JPEG at the tower's side, then text) in ``size.shards``
    WebDataset shards under ``directory``; kept when already written for these parameters."""
    from mm.data.shards import ShardWriter

    stamp = directory / "shards.json"
    wanted = json.dumps({"documents": size.documents, "shards": size.shards, "words": size.words, "side": side,
                         "seed": seed})
    if stamp.is_file() and stamp.read_text() == wanted:
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    rng = random.Random(seed)
    per_shard = -(-size.documents // size.shards)
    with ShardWriter(directory, prefix="interleaved", samples_per_shard=per_shard) as writer:
        for i in range(size.documents):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*size.words))) + "."
            doc = {"kind": "interleaved", "lang": "en", "source": {"bench": i},
                   "content": [{"type": "image", "image": "0.jpg"}, {"type": "text", "text": text}]}
            writer.add(f"doc{i:07d}", doc, [jpeg(rng, side)])
    stamp.write_text(wanted)
    return directory


def train_config(size: Size, workdir: Path, llm_dir: Path, tower_dir: Path, shards: Path, device: str,
                 compile: bool = False):
    """The run's ``TrainConfig``: adapter + LLM train, tower frozen, packing, ZeRO-2, bf16 on CUDA."""
    from mm.config import from_dict
    from mm.train import TrainConfig

    bf16 = device.startswith("cuda")
    steps = size.warmup + size.steps
    return from_dict(TrainConfig, {
        "output_dir": str(workdir / "run"),
        "model": {"encoder": {"name": f"hf:{tower_dir}", "select_layer": -2}, "adapter": "mlp",
                  "llm": f"hf:{llm_dir}", "dtype": "bfloat16" if bf16 else "float32"},
        "data": {"train": str(shards), "batch_size": size.batch_size, "seq_len": size.seq_len, "pack": True,
                 "num_workers": size.num_workers, "shuffle_buffer": 64},
        "stage": {"name": "bench", "kind": "interleaved", "loss": "lm",
                  "trainable": [{"pattern": "adapter.*", "lr": 1e-4}, {"pattern": "llm.*", "lr": 1e-5}]},
        "trainer": {"max_steps": steps, "save_every": steps, "keep_last": 1, "log_every": 1, "zero_stage": 2,
                    "precision": "bf16" if bf16 else "fp32", "report_to": [], "compile": compile},
    })


# ----- counting ----------------------------------------------------------------------------------------------
def batch_stats(batch: dict, pad_id: int) -> dict:
    """What one packed batch holds: tokens (non-pad, as the loop counts them), labelled positions (where the LM
    head runs), images, padded width, documents and the sum of their squared lengths (attention)."""
    from mm.train.loop import count_tokens

    ids, positions = batch["input_ids"], batch["position_ids"]
    lengths = []
    for row_ids, row_positions in zip(ids, positions):
        filled = int((row_ids != pad_id).sum())  # documents first, then padding: a block of its own
        starts = (row_positions[:filled] == 0).nonzero().flatten().tolist() + [filled]
        lengths += [b - a for a, b in zip(starts, starts[1:])]
    return {"tokens": count_tokens(batch, pad_id), "labelled": int((batch["labels"][:, 1:] != -100).sum()),
            "images": int(batch["pixel_values"].shape[0]) if "pixel_values" in batch else 0,
            "rows": int(ids.shape[0]), "width": int(ids.shape[1]), "documents": len(lengths),
            "sum_sq_lengths": sum(n * n for n in lengths)}


class Counted:
    """The loader's batches, each one's ``batch_stats`` recorded as the training loop takes it."""

    def __init__(self, loader, pad_id: int):
        self.loader, self.pad_id, self.stats = loader, pad_id, []

    def __iter__(self):
        for batch in self.loader:
            self.stats.append(batch_stats(batch, self.pad_id))
            yield batch

    def metrics(self) -> dict:  # the loader's document counts, logged by the loop as with its own loader
        return self.loader.metrics()


def part_params(model) -> dict:
    """Parameter counts the FLOPs use: the LLM's decoder body and head, the adapter, the (cut) tower."""
    llm = model.llm
    embed, head = llm.get_input_embeddings().weight, llm.get_output_embeddings().weight
    skip = {id(embed), id(head)}
    body = sum(p.numel() for p in llm.parameters() if id(p) not in skip)
    tower = dict(model.encoder.named_parameters())
    return {"llm_body": body, "llm_head": head.numel(), "llm_total": body + head.numel(),
            "adapter": sum(p.numel() for p in model.adapter.parameters()),
            "tower": sum(p.numel() for name, p in tower.items() if "position_embedding" not in name
                         and "class_embedding" not in name)}


def step_flops(stats: dict, params: dict, shape: dict) -> dict:
    """Model FLOPs of one step (see the module docstring)."""
    tower_tokens = shape["tower_tokens"]
    tower = stats["images"] * (2 * params["tower"] * tower_tokens
                               + 4 * shape["tower_layers"] * shape["tower_width"] * tower_tokens ** 2)
    return {"llm": 6 * params["llm_body"] * stats["tokens"] + 6 * params["llm_head"] * stats["labelled"],
            "llm_6n": 6 * params["llm_total"] * stats["tokens"],
            "attention": 6 * shape["llm_layers"] * shape["llm_attention_width"] * stats["sum_sq_lengths"],
            "adapter": 6 * params["adapter"] * shape["tokens_per_image"] * stats["images"],
            "tower": tower}


def model_shape(model) -> dict:
    """Layers and widths the attention FLOPs use; the tower's layers as cut at ``select_layer``."""
    llm, tower = model.llm.config, model.encoder.model.config
    head_dim = getattr(llm, "head_dim", None) or llm.hidden_size // llm.num_attention_heads
    kept = getattr(model.encoder.model, "vision_model", model.encoder.model).encoder.layers
    return {"llm_layers": llm.num_hidden_layers, "llm_attention_width": llm.num_attention_heads * head_dim,
            "tower_layers": len(kept), "tower_width": tower.hidden_size,
            "tower_tokens": model.encoder.grid[0] * model.encoder.grid[1] + model.encoder.num_prefix_tokens,
            "tokens_per_image": model.tokens_per_image}


# ----- the run -----------------------------------------------------------------------------------------------
def single_process_env() -> None:
    """The variables a one-process DeepSpeed group needs, a free port among them (unless a group exists)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])


class Tee(io.TextIOBase):
    """Writes through to ``stream`` and keeps a copy."""

    def __init__(self, stream):
        self.stream, self.parts = stream, []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def text(self) -> str:
        return "".join(self.parts)


def read_metrics(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [line for line in lines if "tokens_per_s" in line]


def peak_memory_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # kB on Linux


def measure(size_name: str = "tiny", device: str = "cpu", workdir: str | Path | None = None,
            steps: int | None = None, compile: bool = False, **changes) -> dict:
    """Write the inputs under ``workdir`` (a temporary folder, removed after, when None), train, report.
    ``changes``: other values for ``Size`` fields (``batch_size=4``, ``seq_len=4096``)."""
    if device.startswith("cuda") != torch.cuda.is_available():
        raise MMError(f"device {device}, but CUDA is {'' if torch.cuda.is_available() else 'not '}available "
                           "(the engine trains on the GPU whenever there is one)")
    changes = {key: value for key, value in {**changes, "steps": steps}.items() if value is not None}
    size = Size(**{**asdict(SIZES[size_name]), **changes})
    temporary = workdir is None
    root = Path(tempfile.mkdtemp(prefix="train_mm-") if temporary else workdir)
    root.mkdir(parents=True, exist_ok=True)
    try:
        report = _measure(size, size_name, device, root, compile)
        if temporary:  # gone with the folder
            del report["run"], report["final"]
        return report
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)


def _measure(size: Size, size_name: str, device: str, root: Path, compile: bool) -> dict:
    from mm.data import build_loader
    from mm.train.loop import train
    from mm.train.preflight import meta_model
    from tools.bench.timing import matmul_peak

    llm_dir, tower_dir = write_models(size, root / "models")
    shards = write_shards(size, root / "shards", side=size.tower["image_size"])
    config = train_config(size, root, llm_dir, tower_dir, shards, device, compile)
    shutil.rmtree(config.output_dir, ignore_errors=True)  # a fresh run, never a resume of the last one
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    peak = matmul_peak(device, dtype, n=8192 if cuda else 512, batch=20, rounds=1 if cuda else 3, warmup=3)

    skeleton = meta_model(config)  # tokenizer, transform, image tokens and shapes; no weights
    params, shape = part_params(skeleton), model_shape(skeleton)
    pad_id = skeleton.tokenizer.pad_token_id
    batches = Counted(build_loader(config.data, skeleton, kind=config.stage.kind), pad_id)
    single_process_env()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    log = Tee(sys.stdout)
    with contextlib.redirect_stdout(log):  # the loop states the attention path it chose in one line
        final = train(config, batches=batches, progress=False)
    attention = next((line.removeprefix("attention: ") for line in log.text().splitlines()
                      if line.startswith("attention: ")), "not stated")

    logged = read_metrics(Path(config.output_dir))
    total_steps = size.warmup + size.steps
    if [line["step"] for line in logged] != list(range(1, total_steps + 1)) or len(batches.stats) < total_steps:
        raise RuntimeError(f"train_mm: expected {total_steps} logged steps, got {[m['step'] for m in logged]}")
    measured = []
    for line, stats in list(zip(logged, batches.stats))[size.warmup:]:
        flops = step_flops(stats, params, shape)
        measured.append({"step": line["step"], "seconds": stats["tokens"] / line["tokens_per_s"],
                         "tokens_per_s": line["tokens_per_s"], "loss": line["loss"], **stats, "flops": flops})
    seconds = sum(m["seconds"] for m in measured)
    tokens = sum(m["tokens"] for m in measured)
    flops = {key: sum(m["flops"][key] for m in measured) for key in measured[0]["flops"]}
    model_flops = flops["llm"] + flops["adapter"] + flops["tower"]
    mfu = model_flops / seconds / peak
    n = len(measured)
    return {
        "size": size_name, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "precision": "bf16" if cuda else "fp32", "zero_stage": config.trainer.zero_stage, "compile": compile,
        "attention": attention,
        "seq_len": size.seq_len, "batch_size": size.batch_size, "warmup_steps": size.warmup, "steps": n,
        "tokens_per_s": tokens / seconds,
        "tokens_per_s_median": statistics.median(m["tokens_per_s"] for m in measured),
        "step_s": seconds / n,
        "tokens_per_step": tokens / n,
        "images_per_step": sum(m["images"] for m in measured) / n,
        "documents_per_step": sum(m["documents"] for m in measured) / n,
        "packing_fill": tokens / sum(m["rows"] * m["width"] for m in measured),
        "params_m": {key: value / 1e6 for key, value in params.items()},
        "llm_flops_per_step": flops["llm"] / n,
        "attention_flops_per_step": flops["attention"] / n,
        "adapter_flops_per_step": flops["adapter"] / n,
        "tower_flops_per_step": flops["tower"] / n,
        "tower_share": flops["tower"] / model_flops,
        "llm_mfu": flops["llm"] / seconds / peak,
        "llm_mfu_6n": flops["llm_6n"] / seconds / peak,
        "tower_mfu": flops["tower"] / seconds / peak,
        "mfu": mfu,
        "mfu_with_attention": (model_flops + flops["attention"]) / seconds / peak,
        "gpu_train_mfu": mfu if cuda else "n/a",
        "flops_count": "llm 6*N_body per token + 6*N_head per labelled position; adapter 6*N per image token; "
                       "tower forward only 2*N per tower token + its attention; LLM attention only in "
                       "mfu_with_attention (causal, per document)",
        f"peak_{'bf16' if cuda else 'fp32'}_tflops": peak / 1e12,
        "peak_memory_gb": peak_memory_gb(device),
        "peak_memory": "torch.cuda.max_memory_allocated" if cuda else "process peak resident set (ru_maxrss)",
        "loss_first_last": [logged[0]["loss"], logged[-1]["loss"]],
        "measured": [{k: v for k, v in m.items() if k != "flops"} for m in measured],
        "run": str(Path(config.output_dir)), "final": str(final),
    }


def run(quick: bool = False, device: str = "cuda") -> dict:
    """``python -m tools.bench`` entry: the 0.5b size on CUDA (``quick``: 4 measured steps); tiny on CPU."""
    if not device.startswith("cuda"):
        return measure("tiny", "cpu")
    return measure("0.5b", device, steps=4 if quick else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="0.5b", choices=sorted(SIZES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (after the size's warm-up steps)")
    parser.add_argument("--workdir", default=None, help="keep models, shards and the run here (default: a "
                        "temporary folder, removed after)")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per step (default: the size's)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per packed row (default: the size's)")
    parser.add_argument("--num-workers", type=int, default=None, help="loader processes (default: the size's)")
    parser.add_argument("--compile", action="store_true", help="trainer.compile (torch.compile the decoder)")
    args = parser.parse_args()
    try:
        report = measure(args.size, args.device, args.workdir, args.steps, args.compile, batch_size=args.batch_size,
                         seq_len=args.seq_len, num_workers=args.num_workers)
    except MMError as exc:  # a refused input or config: one line
        parser.exit(2, f"train_mm: error: {exc}\n")
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
