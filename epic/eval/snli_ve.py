"""SNLI-VE: does the image entail, contradict or say nothing about the hypothesis? Accuracy in percent."""
from __future__ import annotations

from epic.models.downstream import SNLI_LABELS

from .common import eval_mode, model_device_dtype, sum_across_ranks, to_model
from .nlvr2 import correct_count


def parse_label(value) -> int:
    """"entailment" / "neutral" / "contradiction" (ALBEF, SNLI-VE) or the class index."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(SNLI_LABELS):
        return value
    key = str(value).strip().lower()
    if key not in SNLI_LABELS:
        raise ValueError(f"SNLI-VE label {value!r} is not one of {SNLI_LABELS}")
    return SNLI_LABELS.index(key)


def evaluate_snli_ve(model, loader) -> dict:
    device, dtype = model_device_dtype(model)
    correct, count = 0, 0
    with eval_mode(model):
        for batch in loader:
            batch = to_model(batch, device, dtype)
            logits = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
            correct += correct_count(logits, batch["labels"])
            count += logits.shape[0]
    correct, count = sum_across_ranks([correct, count], device)
    return {"accuracy": 100.0 * correct / max(count, 1), "num_examples": int(count)}
