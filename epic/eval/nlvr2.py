"""NLVR2: is the statement true of the pair of images? Accuracy in percent."""
from __future__ import annotations

import torch

from .common import eval_mode, model_device_dtype, sum_across_ranks, to_model

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
    device, dtype = model_device_dtype(model)
    correct, count = 0, 0
    with eval_mode(model):
        for batch in loader:
            batch = to_model(batch, device, dtype)
            logits = model(batch["pixel_values_0"], batch["pixel_values_1"], batch["input_ids"],
                           batch["attention_mask"])
            correct += correct_count(logits, batch["labels"])
            count += logits.shape[0]
    correct, count = sum_across_ranks([correct, count], device)
    return {"accuracy": 100.0 * correct / max(count, 1), "num_examples": int(count)}
