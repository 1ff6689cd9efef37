"""The frozen teacher VLM of EPIC's saliency-based masking (Sec. 4.4, App. C).

A METER loaded from one of our checkpoints (run dir, ``checkpoints/`` dir or ``step_*`` dir), an export dir
(``model.safetensors`` + ``config.yaml`` or ``config.json``) or an official METER ``.ckpt``. It is never trained:
``eval()``, ``requires_grad_(False)``, no optimizer, no DeepSpeed engine (so no ZeRO partition), and it runs under
``torch.inference_mode`` in half precision on GPU. Eq. 8 only needs the penultimate fusion layer's image-stream
[CLS] query and text-stream keys, so everything after them (the last fusion layers, the penultimate text layer,
the poolers and heads) is dropped when the teacher is loaded.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from epic.config import ConfigError

from .meter import METER, WEIGHTS_NAME, config_from_dict, load_official_meter

logger = logging.getLogger(__name__)

OFFICIAL_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")
# Trainable heads our runs add to METER that a teacher never needs (EPIC's consistency head beta).
EXTRA_HEAD_PREFIXES = ("itc_score.",)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class TeacherError(ConfigError):
    """The teacher cannot be loaded or does not fit the run (the message says why and what to do)."""


class SaliencyTeacher(nn.Module):
    """Frozen METER up to the penultimate fusion layer: (image, caption) -> the query and keys of Eq. 8."""

    def __init__(self, vlm: METER):
        super().__init__()
        self.vlm = prune_after_saliency(vlm)
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
        """q_k^V [B, H, dh] (image [CLS] query) and K_k^W [B, H, L, dh] (text keys) per head k (Eq. 8's inputs)."""
        dtype = next(self.vlm.parameters()).dtype
        out = self.vlm.infer(input_ids=input_ids, attention_mask=attention_mask,
                             pixel_values=pixel_values.to(dtype), return_saliency_qk=True,
                             stop_before_last_layer=True)
        return out["saliency_query"], out["saliency_keys"]


def prune_after_saliency(vlm: METER) -> METER:
    """Drop what ``infer(..., stop_before_last_layer=True)`` never runs: the last fusion layer of both streams,
    the penultimate text layer (its keys come from that layer's *input*), the poolers and the heads."""
    layers = vlm.config.num_fusion_layers
    if layers < 2:
        raise TeacherError(f"the teacher has num_fusion_layers={layers}; Eq. 8 needs a penultimate fusion layer")
    vlm.cross_modal_text_layers = nn.ModuleList(list(vlm.cross_modal_text_layers[:layers - 2]) + [nn.Identity()])
    vlm.cross_modal_image_layers = nn.ModuleList(list(vlm.cross_modal_image_layers[:layers - 1]))
    for name in ("cross_modal_text_pooler", "cross_modal_image_pooler", "mlm_score", "itm_score", "itc_score"):
        if hasattr(vlm, name):
            setattr(vlm, name, None)
    return vlm


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------
def load_teacher(source: str, device, dtype: str = "auto") -> SaliencyTeacher:
    """The frozen teacher from a run/checkpoint dir, an export dir or an official METER checkpoint file.

    An official ``X.ckpt`` may have an ``X.json`` beside it with METERConfig fields that its tensors cannot tell
    (``num_heads``, ``vit_heads``, ``text_heads``; by default width // 64, METER's rule).
    ``dtype``: "auto" (fp16 on CUDA, fp32 on CPU) | "fp16" | "bf16" | "fp32".
    """
    device = torch.device(device)
    vlm = load_meter_weights(source)
    torch_dtype = resolve_teacher_dtype(dtype, device)
    teacher = SaliencyTeacher(vlm).to(device=device, dtype=torch_dtype)
    logger.info("teacher %s: %s params, %s on %s", source, sum(p.numel() for p in teacher.parameters()),
                torch_dtype, device)
    return teacher


def resolve_teacher_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise TeacherError(f"epic.teacher_dtype={dtype!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_meter_weights(source: str) -> METER:
    """A full METER with the weights of ``source`` (see the module docstring for the accepted kinds)."""
    path = Path(source)
    if not path.exists():
        raise TeacherError(f"epic.teacher={source} does not exist (a run dir, checkpoint dir, export dir or official "
                           f"METER .ckpt)")
    if path.is_file():
        if path.suffix not in OFFICIAL_SUFFIXES:
            raise TeacherError(f"epic.teacher={source}: a file must be an official METER checkpoint "
                               f"({', '.join(OFFICIAL_SUFFIXES)})")
        overrides = path.with_suffix(".json")  # optional METERConfig fields the tensors cannot tell (head counts)
        return load_official_meter(str(path), str(overrides) if overrides.is_file() else None,
                                   allow_missing_heads=True)
    if (path / WEIGHTS_NAME).is_file():
        return _load_export_dir(path)
    return _load_run_checkpoint(path)


def _build_meter(model_values: dict, source: str) -> METER:
    values = {**model_values, "vit_pretrained": None, "text_pretrained": None}  # the weights come from the file
    try:
        cfg = config_from_dict(values, source=source)
    except (TypeError, ValueError) as err:
        raise TeacherError(f"teacher {source}: its model config does not fit this METER ({err})") from err
    return METER(cfg)


def _load_state(model: METER, state: dict, source: str) -> METER:
    state = {k: v for k, v in state.items() if not k.startswith(EXTRA_HEAD_PREFIXES)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise TeacherError(f"teacher {source}: weights do not match its config: missing {missing[:8]}, "
                           f"unexpected {unexpected[:8]}")
    return model


def _load_export_dir(path: Path) -> METER:
    from safetensors.torch import load_file

    if (path / "config.yaml").is_file():
        import yaml

        data = yaml.safe_load((path / "config.yaml").read_text()) or {}
        model_values = data.get("model", data)  # a run config (its model section) or a bare METERConfig
    elif (path / "config.json").is_file():
        model_values = json.loads((path / "config.json").read_text())
    else:
        raise TeacherError(f"teacher export dir {path} has {WEIGHTS_NAME} but no config.yaml / config.json")
    model = _build_meter(model_values, str(path))
    return _load_state(model, load_file(str(path / WEIGHTS_NAME)), str(path))


def _load_run_checkpoint(path: Path) -> METER:
    from epic.engine.checkpoint import CheckpointError, load_model_from_checkpoint

    try:
        model, _, step_dir = load_model_from_checkpoint(path, "vlm")
    except CheckpointError as err:
        raise TeacherError(f"epic.teacher={path}: {err} (expected a run dir / checkpoint dir of epic/pretrain.py, an "
                           f"export dir with {WEIGHTS_NAME}, or an official METER .ckpt)") from err
    logger.info("teacher weights from %s", step_dir)
    return model


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
                           "with the same tokenizer and image size (e.g. a vanilla METER run on the same data).")
