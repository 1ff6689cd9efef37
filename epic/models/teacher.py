"""The frozen teacher VLM of EPIC's saliency-based masking (Sec. 4.4, App. C), for every model family.

Any weight source of ``epic.models.loading`` (run dir, ``checkpoints/`` dir, ``step_*`` dir, export dir, official
checkpoint). It is never trained: the family's ``saliency_teacher()`` copy (pruned to what ``saliency_qk`` runs,
``requires_grad_(False)``), always in eval mode, no optimizer, no DeepSpeed engine (so no ZeRO partition), run
under ``torch.inference_mode`` in half precision on GPU. Eq. 8 only needs the family's saliency layer's query and
keys (METER: the penultimate fusion layer's image-stream [CLS] query and text-stream keys).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from epic.config import ConfigError

from .interface import VLPModel
from .loading import load_model

logger = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class TeacherError(ConfigError):
    """The teacher cannot be loaded or does not fit the run (the message says why and what to do)."""


class SaliencyTeacher(nn.Module):
    """A frozen VLM pruned after its saliency layer: (image, caption) -> the query and keys of Eq. 8."""

    def __init__(self, vlm: VLPModel):
        super().__init__()
        try:
            self.vlm = vlm.saliency_teacher()
        except ValueError as err:
            raise TeacherError(f"the teacher cannot give EPIC's saliency: {err}") from err
        self.requires_grad_(False)
        self.train(False)

    @property
    def config(self):
        return self.vlm.config

    def train(self, mode: bool = True) -> "SaliencyTeacher":
        return super().train(False)  # always in eval mode: no dropout in the saliency

    @torch.inference_mode()
    def query_keys(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """q_k [B, H, dh] and K_k [B, H, L, dh] per head k (Eq. 8's inputs, the family's ``saliency_qk``)."""
        dtype = next(self.vlm.parameters()).dtype
        return self.vlm.saliency_qk(input_ids, attention_mask, pixel_values=pixel_values.to(dtype))


def load_teacher(source: str, device, dtype: str = "auto") -> SaliencyTeacher:
    """The frozen teacher from any weight source (``epic.models.loading.load_model``).

    An official ``X.ckpt`` may have an ``X.json`` beside it with config fields that its tensors cannot tell
    (METER: ``num_heads``, ``vit_heads``, ``text_heads``; by default width // 64) and ``"family"``.
    ``dtype``: "auto" (fp16 on CUDA, fp32 on CPU) | "fp16" | "bf16" | "fp32".
    """
    device = torch.device(device)
    torch_dtype = resolve_teacher_dtype(dtype, device)
    vlm = load_teacher_weights(source)
    teacher = SaliencyTeacher(vlm).to(device=device, dtype=torch_dtype)
    logger.info("teacher %s: %s params, %s on %s", source, sum(p.numel() for p in teacher.parameters()),
                torch_dtype, device)
    return teacher


def load_saliency_teacher(cfg, tokenizer, device) -> SaliencyTeacher:
    """The frozen teacher of ``epic.teacher`` (EPIC's saliency masking, †CMLM) for a run config, checked against
    the data's sizes."""
    from epic.paths import expand_env

    teacher = load_teacher(expand_env(cfg.epic.teacher, "epic.teacher"), device, cfg.epic.teacher_dtype)
    check_teacher_fits(teacher, tokenizer, cfg.data.image_size, cfg.data.max_text_len)
    return teacher


def resolve_teacher_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise TeacherError(f"epic.teacher_dtype={dtype!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_teacher_weights(source: str) -> VLPModel:
    """The full VLM of ``source`` (before pruning), or a TeacherError saying what a teacher can be."""
    try:
        return load_model(source).model
    except (FileNotFoundError, ValueError, KeyError, OSError) as err:
        raise TeacherError(f"epic.teacher={source}: {err} (a run dir / checkpoint dir of epic/pretrain.py, an "
                           f"export dir with model.safetensors, or an official checkpoint)") from err


load_meter_weights = load_teacher_weights  # the old name


def check_teacher_fits(teacher: SaliencyTeacher, tokenizer, image_size: int, max_text_len: int) -> None:
    """The teacher reads our batches: same tokenizer ids, image size and enough text positions."""
    cfg = teacher.config
    problems = []
    if cfg.vocab_size < len(tokenizer):
        problems.append(f"its vocabulary has {cfg.vocab_size} ids, the tokenizer {len(tokenizer)}")
    if cfg.pad_token_id != tokenizer.pad_token_id:
        problems.append(f"its pad id is {cfg.pad_token_id}, the tokenizer's {tokenizer.pad_token_id}")
    if cfg.image_size != image_size:
        problems.append(f"it reads {cfg.image_size}px images, the data are {image_size}px (data.image_size)")
    if cfg.max_text_len < max_text_len:
        problems.append(f"its max_text_len is {cfg.max_text_len} < data.max_text_len={max_text_len}")
    if problems:
        raise TeacherError("the teacher does not fit this run: " + "; ".join(problems) + ". Use a teacher trained "
                           "with the same tokenizer and image size (e.g. a vanilla run of the same family on the same data).")
