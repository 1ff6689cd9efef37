"""SNLI-VE: does the image entail, contradict or say nothing about the hypothesis? Accuracy in percent."""
from __future__ import annotations

from .common import score_over_loader, single_image_forward
from .nlvr2 import correct_count

SNLI_LABELS = ("contradiction", "neutral", "entailment")  # class index = position


def parse_label(value) -> int:
    """"entailment" / "neutral" / "contradiction" (ALBEF, SNLI-VE) or the class index."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(SNLI_LABELS):
        return value
    key = str(value).strip().lower()
    if key not in SNLI_LABELS:
        raise ValueError(f"SNLI-VE label {value!r} is not one of {SNLI_LABELS}")
    return SNLI_LABELS.index(key)


def evaluate_snli_ve(model, loader) -> dict:
    correct, count = score_over_loader(model, loader, single_image_forward,
                                       lambda logits, batch: correct_count(logits, batch["labels"]))
    return {"accuracy": 100.0 * correct / max(count, 1), "num_examples": count}
