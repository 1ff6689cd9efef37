"""NLVR2: is the statement true of the pair of images? Accuracy in percent."""
from __future__ import annotations

import torch

from .common import score_over_loader

LABELS = {"true": 1, "false": 0, "1": 1, "0": 0}


def parse_label(value) -> int:
    """ALBEF's "True"/"False", METER's answers, booleans or 0/1 -> 1 (true) / 0 (false)."""
    if isinstance(value, bool):
        return int(value)
    key = str(value).strip().lower()
    if key not in LABELS:
        raise ValueError(f"NLVR2 label {value!r} is not one of True/False/1/0")
    return LABELS[key]


def correct_count(logits: torch.Tensor, labels: torch.Tensor) -> int:
    return int((logits.argmax(dim=-1) == labels).sum())


def evaluate_nlvr2(model, loader) -> dict:
    def forward(model, batch):
        return model(batch["pixel_values_0"], batch["pixel_values_1"], batch["input_ids"], batch["attention_mask"])

    correct, count = score_over_loader(model, loader, forward,
                                       lambda logits, batch: correct_count(logits, batch["labels"]))
    return {"accuracy": 100.0 * correct / max(count, 1), "num_examples": count}
