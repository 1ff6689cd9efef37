"""Learning-rate schedules as multipliers of the base lr (one call per optimizer step)."""
from __future__ import annotations

import math
from functools import partial

import torch


def linear_warmup_decay(step: int, total_steps: int, warmup_steps: int) -> float:
    """METER: linear warm-up from 0 to 1, then linear decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    remaining = max(total_steps - warmup_steps, 1)
    return max(0.0, (total_steps - step) / remaining)


def tri_stage(step: int, total_steps: int, warmup_steps: int, hold_steps: int, final_scale: float) -> float:
    """EPIC App. F: linear warm-up, hold at the peak, then exponential decay to `final_scale` of the peak."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step < warmup_steps + hold_steps:
        return 1.0
    decay_steps = max(total_steps - warmup_steps - hold_steps, 1)
    progress = min((step - warmup_steps - hold_steps) / decay_steps, 1.0)
    return math.exp(math.log(final_scale) * progress)


def cosine_warmup(step: int, total_steps: int, warmup_steps: int, final_scale: float,
                  warmup_start_scale: float = 0.0) -> float:
    """ALBEF (configs/Pretrain.yaml: cosine, warmup_lr 1e-5, min_lr 1e-5 for lr 1e-4): linear warm-up from
    `warmup_start_scale` to 1, then half a cosine from 1 down to `final_scale` at `total_steps`, held after.

    Per optimizer step (ALBEF steps timm's CosineLRScheduler per 100 iterations in warm-up, then per epoch)."""
    if step < warmup_steps:
        return warmup_start_scale + (1.0 - warmup_start_scale) * step / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return final_scale + (1.0 - final_scale) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_multiplier_fn(schedule: str, total_steps: int, warmup_ratio: float, hold_ratio: float = 0.8,
                     final_scale: float = 0.01, warmup_start_scale: float = 0.0):
    warmup_steps = int(round(warmup_ratio * total_steps))
    if schedule == "linear":
        return partial(linear_warmup_decay, total_steps=total_steps, warmup_steps=warmup_steps)
    if schedule == "tri_stage":
        hold_steps = int(round(hold_ratio * total_steps))
        return partial(tri_stage, total_steps=total_steps, warmup_steps=warmup_steps, hold_steps=hold_steps,
                       final_scale=final_scale)
    if schedule == "cosine":
        return partial(cosine_warmup, total_steps=total_steps, warmup_steps=warmup_steps, final_scale=final_scale,
                       warmup_start_scale=warmup_start_scale)
    raise ValueError(f"unknown schedule '{schedule}': use 'linear', 'tri_stage' or 'cosine'")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup_ratio: float,
                       hold_ratio: float = 0.8, final_scale: float = 0.01,
                       warmup_start_scale: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR (its state is saved by DeepSpeed when passed to `deepspeed.initialize`)."""
    fn = lr_multiplier_fn(schedule, total_steps, warmup_ratio, hold_ratio, final_scale, warmup_start_scale)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
