"""LLaVA-KD: ``lm + a * MDist + b * RDist`` against a frozen teacher that shares the tokenizer.

MDist: KL between teacher and student next-token distributions on response positions and (optionally) on the
image-token positions (unlabelled, so that term is unmasked over the visual positions). Variants: forward
``KL(p_t || p_s)``, reverse ``KL(p_s || p_t)``, ``js``. RDist: per image, relation matrices ``R = Z Z^T`` over
the final hidden states of its visual tokens (so widths may differ); loss ``1 - cos(vec R_t, vec R_s)``.
The teacher is held here, outside the DeepSpeed engine, and runs under ``no_grad``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from mm.config import ModelConfig
from mm.errors import MMError
from mm.train.losses.base import LOSSES, Loss
from mm.train.losses.forward import hidden_states, label_positions, logits_at, targets_at


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "forward",
                  temperature: float = 1.0) -> torch.Tensor:
    """Mean over rows of the chosen divergence between ``[N, V]`` logits (scaled by ``T^2``)."""
    if student_logits.numel() == 0:
        return student_logits.sum()
    s = F.log_softmax(student_logits / temperature, dim=-1)  # [N, V]
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if kind == "forward":
        per_row = (t.exp() * (t - s)).sum(-1)
    elif kind == "reverse":
        per_row = (s.exp() * (s - t)).sum(-1)
    elif kind == "js":
        m = torch.logsumexp(torch.stack([s, t]), dim=0) - math.log(2.0)  # log((p_s + p_t) / 2)
        per_row = 0.5 * (t.exp() * (t - m)).sum(-1) + 0.5 * (s.exp() * (s - m)).sum(-1)
    else:
        raise MMError(f"unknown KL kind {kind!r}; choose one of: forward, reverse, js")
    return per_row.mean() * temperature**2


def mdist(student_logits, teacher_logits, kind="forward", temperature=1.0) -> torch.Tensor:
    return kl_divergence(student_logits, teacher_logits, kind, temperature)


def rdist(student_visual: torch.Tensor, teacher_visual: torch.Tensor) -> torch.Tensor:
    """``[I, M, Ds]`` and ``[I, M, Dt]`` visual hidden states -> mean over images of ``1 - cos(R_s, R_t)``."""
    if student_visual.numel() == 0:
        return student_visual.sum()
    rs = student_visual.float() @ student_visual.float().transpose(1, 2)  # [I, M, M]
    rt = teacher_visual.float() @ teacher_visual.float().transpose(1, 2)
    return (1 - F.cosine_similarity(rs.flatten(1), rt.flatten(1), dim=-1)).mean()


@dataclass
class DistillOptions:
    """``loss = lm_weight * lm + mdist_weight * MDist + rdist_weight * RDist`` against a frozen teacher."""

    teacher: str | None = None  # an mm model dir or a run dir (its final export)
    teacher_model: ModelConfig | None = None  # or: build a teacher from a ModelConfig (tests, pretrained parts)
    kl: Literal["forward", "reverse", "js"] = "forward"
    temperature: float = 1.0
    lm_weight: float = 1.0
    mdist_weight: float = 1.0
    rdist_weight: float = 1.0
    image_positions: bool = True  # MDist also over the image-token positions


class KDLoss(Loss):
    def __init__(self, teacher, kl: str = "forward", temperature: float = 1.0, lm_weight: float = 1.0,
                 mdist_weight: float = 1.0, rdist_weight: float = 1.0, image_positions: bool = True):
        self.teacher = teacher.eval().requires_grad_(False)
        self.kl, self.temperature = kl, temperature
        self.lm_weight, self.mdist_weight, self.rdist_weight = lm_weight, mdist_weight, rdist_weight
        self.image_positions = image_positions

    def frozen_models(self) -> dict:
        return {"teacher": self.teacher}

    def check_student(self, student) -> None:
        """The teacher reads the student's batches (token ids, image tiles): both must expand and tile images
        alike and share the tokenizer."""
        if student.tokens_per_image != self.teacher.tokens_per_image:
            raise MMError(f"teacher and student must give the same tokens per image "
                          f"({self.teacher.tokens_per_image} vs {student.tokens_per_image})")
        if student.encoder.image_size != self.teacher.encoder.image_size:
            raise MMError(f"teacher and student must take the same image size (the teacher encodes the student's "
                          f"pixels): {self.teacher.encoder.image_size} vs {student.encoder.image_size}")
        if student.config.layout != self.teacher.config.layout:
            from mm.schema import to_dict

            raise MMError(f"teacher and student must lay out images alike: teacher "
                          f"{to_dict(self.teacher.config.layout)}, student {to_dict(student.config.layout)}")
        if len(self.teacher.tokenizer) != len(student.tokenizer):
            raise MMError(f"teacher and student must share the tokenizer "
                          f"(vocab {len(self.teacher.tokenizer)} vs {len(student.tokenizer)})")

    def __call__(self, model, batch):
        labels, input_ids = batch["labels"], batch["input_ids"]
        is_image = input_ids == model.image_token_id  # [B, T]
        response = label_positions(labels)
        kd_positions = response | is_image if self.image_positions else response
        hidden = hidden_states(model, batch)  # [B, T, Ds]
        with torch.no_grad():
            teacher_hidden = hidden_states(self.teacher, batch)  # [B, T, Dt]
            teacher_logits = logits_at(self.teacher, teacher_hidden, kd_positions)  # [K, V]
        student_logits = logits_at(model, hidden, kd_positions)  # [K, V]
        # the response positions are a subset of kd_positions: reuse those logits for the LM term
        in_kd = response[kd_positions]  # [K]
        lm = F.cross_entropy(student_logits[in_kd], targets_at(labels, response))
        md = mdist(student_logits, teacher_logits, self.kl, self.temperature)
        M = model.tokens_per_image
        rd = rdist(hidden[is_image].view(-1, M, hidden.shape[-1]),
                   teacher_hidden[is_image].view(-1, M, teacher_hidden.shape[-1]))
        loss = self.lm_weight * lm + self.mdist_weight * md + self.rdist_weight * rd
        return loss, {"lm": lm.detach(), "mdist": md.detach(), "rdist": rd.detach()}


def check_distill(options: DistillOptions, config) -> None:
    if not (options.teacher or options.teacher_model):
        raise MMError("stage.loss=distill needs stage.loss.teacher (a model/run dir) or stage.loss.teacher_model")


@LOSSES.register("distill", options=DistillOptions, check=check_distill, example=lambda workdir: {
    "name": "distill", "teacher_model": {"encoder": "tiny-vit", "adapter": "mlp", "llm": "tiny-qwen2"}})
def build_distill(options: DistillOptions, config) -> KDLoss:
    """The teacher: loaded from ``teacher``, or built from ``teacher_model`` with the run's seed + 1."""
    import torch

    import mm
    from mm.loading import resolve_model_dir

    if options.teacher:
        teacher = mm.load(resolve_model_dir(options.teacher))
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.trainer.seed + 1)
            teacher = mm.build(options.teacher_model)
    return KDLoss(teacher, options.kl, options.temperature, options.lm_weight, options.mdist_weight,
                  options.rdist_weight, options.image_positions)
