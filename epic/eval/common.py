"""Small helpers shared by the task evaluations: sums across ranks, the eval-mode context, the scoring loop."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.distributed as dist


def sum_across_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of per-rank totals (float64), identity without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    if dist.get_backend() != "nccl":
        device = torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, param.dtype


def to_model(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Tensors to the model's device; floating tensors (pixels) to its dtype."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            if value.is_floating_point():
                value = value.to(dtype)
        out[key] = value
    return out


def score_over_loader(model: torch.nn.Module, loader, forward: Callable[[torch.nn.Module, dict], torch.Tensor],
                      score: Callable[[torch.Tensor, dict], float]) -> tuple[float, int]:
    """(sum of `score(logits, batch)`, number of examples) over the loader, summed across ranks."""
    device, dtype = model_device_dtype(model)
    total, count = 0.0, 0
    with eval_mode(model):
        for batch in loader:
            batch = to_model(batch, device, dtype)
            logits = forward(model, batch)
            total += score(logits, batch)
            count += logits.shape[0]
    total, count = sum_across_ranks([total, count], device)
    return total, int(count)


def single_image_forward(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Logits of a one-image task model (VQA, SNLI-VE)."""
    return model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
