"""Small helpers shared by the task evaluations: sums across ranks and the eval-mode context."""
from __future__ import annotations

import contextlib

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
