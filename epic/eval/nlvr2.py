"""NLVR2: is the statement true of the pair of images? Accuracy in percent."""
from __future__ import annotations

from typing import Sequence

import torch

from .common import model_device_dtype, score_over_loader, sum_across_ranks

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


def evaluate_nlvr2(model, loader, kinds: Sequence[str] = ()) -> dict:
    """Accuracy (%) over the loader; where its batches carry `kinds` (indices into `kinds`: the shapes world's
    statement templates, epic.data.tasks.NLVR2_KINDS), also the accuracy of each kind ("by_kind")."""
    per_kind = torch.zeros(len(kinds), 2, dtype=torch.float64)  # [kind, (correct, count)]

    def forward(model, batch):
        return model(batch["pixel_values_0"], batch["pixel_values_1"], batch["input_ids"], batch["attention_mask"])

    def score(logits, batch):
        hits = (logits.argmax(dim=-1) == batch["labels"]).double().cpu()
        if kinds and "kinds" in batch:
            per_kind.index_add_(0, batch["kinds"].cpu(), torch.stack([hits, torch.ones_like(hits)], dim=1))
        return float(hits.sum())

    correct, count = score_over_loader(model, loader, forward, score)
    result = {"accuracy": 100.0 * correct / max(count, 1), "num_examples": count}
    totals = torch.tensor(sum_across_ranks(per_kind.flatten().tolist(), model_device_dtype(model)[0])).view(-1, 2)
    if totals[:, 1].sum() > 0:
        result["by_kind"] = {name: 100.0 * float(c / n) for name, (c, n) in zip(kinds, totals.tolist()) if n}
    return result
