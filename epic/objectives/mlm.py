"""Masked language modelling conditioned on the image (METER's MLM): predict ``mlm_labels`` where != -100."""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def mlm_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Mean cross-entropy and accuracy over positions with a label (!= -100), in fp32.

    A batch without any masked token gives loss 0 (and no gradient) instead of METER's NaN, so the ITM half of
    the step is not thrown away with it.
    """
    logits = logits.float().flatten(0, -2)
    labels = labels.flatten()
    selected = labels != IGNORE_INDEX
    count = selected.sum().clamp(min=1)
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum") / count
    correct = ((logits.argmax(dim=-1) == labels) & selected).sum()
    return {"loss_mlm": loss, "mlm_acc": (correct.float() / count).detach()}


def compute_mlm(model, batch: dict, image_embeds: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Fusion on (``mlm_input_ids``, image) → MLM head on every text position → CE on the masked ones."""
    labels = batch["mlm_labels"]
    if labels.shape != batch["mlm_input_ids"].shape:
        raise ValueError(f"mlm_labels {tuple(labels.shape)} and mlm_input_ids {tuple(batch['mlm_input_ids'].shape)} "
                         f"differ in shape; the collator must emit one label per input position")
    out = model.infer(input_ids=batch["mlm_input_ids"], attention_mask=batch["attention_mask"],
                      image_embeds=image_embeds)
    return mlm_cross_entropy(model.mlm_score(out["text_feats"]), labels)
