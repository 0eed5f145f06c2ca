"""Helpers for data tests: image bytes, documents, caption shards."""
from __future__ import annotations

import io

from PIL import Image

from mm.data import ShardWriter


def png(color=(200, 30, 30), size=(24, 20), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def caption_doc(text: str, images: int = 1) -> dict:
    content = []
    for _ in range(images):
        content.append({"type": "image", "image": ""})
    content.append({"type": "text", "text": text})
    return {"kind": "interleaved", "lang": "en", "content": content}


def chat_doc(question: str, answer: str) -> dict:
    return {"kind": "chat", "lang": "en", "messages": [
        {"role": "user", "content": [{"type": "image", "image": ""}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}


def write_captions(directory, n: int, shards: int = 2, prefix: str = "cap") -> list[str]:
    """``n`` one-image caption docs with distinct texts ``doc <i> ...`` spread over ``shards`` shards."""
    per = -(-n // shards)
    with ShardWriter(directory, prefix, samples_per_shard=per) as writer:
        for i in range(n):
            words = " ".join(["red circle"] * (1 + i % 5))
            writer.add(f"{prefix}{i:05d}", caption_doc(f"doc {i} {words}"), [png((i * 40 % 255, 80, 120))])
    return [str(p) for p in writer.written]
