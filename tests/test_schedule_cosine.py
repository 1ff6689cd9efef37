"""The cosine schedule (ALBEF: warm-up from warmup_lr, half cosine to min_lr) against its closed form."""
import math

import pytest
import torch

from epic.engine.schedule import build_lr_scheduler, lr_multiplier_fn


def test_cosine_schedule_shape():
    # ALBEF's recipe scaled: lr 1e-4, warmup_lr 1e-5 and min_lr 1e-5 are 0.1 of the peak
    fn = lr_multiplier_fn("cosine", total_steps=1000, warmup_ratio=0.1, final_scale=0.1, warmup_start_scale=0.1)
    assert fn(0) == pytest.approx(0.1) and fn(50) == pytest.approx(0.1 + 0.9 * 0.5) and fn(100) == pytest.approx(1.0)
    assert all(fn(s) < fn(s + 1) for s in range(0, 99))  # rising warm-up
    assert all(fn(s) > fn(s + 1) for s in range(100, 999))  # decaying
    assert fn(550) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half-way: the midpoint
    assert fn(1000) == pytest.approx(0.1) and fn(5000) == pytest.approx(0.1)  # held at min_lr after the end
    no_warmup = lr_multiplier_fn("cosine", total_steps=10, warmup_ratio=0.0, final_scale=0.0)
    assert no_warmup(0) == pytest.approx(1.0) and no_warmup(10) == pytest.approx(0.0)


def test_cosine_scheduler_drives_the_optimizer():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1e-4)
    scheduler = build_lr_scheduler(optimizer, "cosine", total_steps=20, warmup_ratio=0.1, final_scale=0.1,
                                   warmup_start_scale=0.1)
    lrs = []
    for _ in range(21):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-5) and lrs[2] == pytest.approx(1e-4) and lrs[20] == pytest.approx(1e-5)
    with pytest.raises(ValueError, match="'cosine'"):
        lr_multiplier_fn("cosin", 10, 0.1)
