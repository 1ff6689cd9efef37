"""Non-finite losses per engine: counted on the device during a step, read once per optimizer step.

DeepSpeed's overflow check skips an engine's optimizer step when its loss (hence its gradients) is not finite, on
every rank, so a NaN batch costs one step of that engine and leaves the others alone. The guard counts such steps
per engine and the streak of optimizer steps with any non-finite loss; `train.max_nonfinite_steps` in a row stops
the run (the trainer saves first: the skipped engines still hold the weights of the last good step).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist


class NonfiniteGuard:
    def __init__(self, engines: Iterable[str], max_in_a_row: int, device: torch.device) -> None:
        self.names = list(engines)
        self.max_in_a_row = max_in_a_row  # 0: never stop
        self.device = device
        self.flags = torch.zeros(len(self.names), device=device)  # this step: micro-batches with a bad loss
        self.steps = {name: 0 for name in self.names}  # optimizer steps with a non-finite loss, per engine
        self.in_a_row = 0
        self.first_bad_step = None  # first step of the current streak

    def observe(self, engine: str, loss: torch.Tensor) -> None:
        """No host sync: adds 1 on the device when `loss` has a non-finite value."""
        index = self.names.index(engine)
        self.flags[index] += (~torch.isfinite(loss.detach().float())).any().float()

    def end_step(self, step: int) -> list[str]:
        """After optimizer step `step`: one all-reduce and one host read. Returns the engines that had a non-finite
        loss in this step on any rank."""
        flags = self.flags
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad = [name for name, value in zip(self.names, flags.tolist()) if value > 0]
        self.flags = torch.zeros_like(self.flags)
        for name in bad:
            self.steps[name] += 1
        if bad:
            self.in_a_row += 1
            self.first_bad_step = self.first_bad_step or step
        else:
            self.in_a_row, self.first_bad_step = 0, None
        return bad

    @property
    def should_stop(self) -> bool:
        return self.max_in_a_row > 0 and self.in_a_row >= self.max_in_a_row

    def state_dict(self) -> dict:
        return {"steps": dict(self.steps), "in_a_row": self.in_a_row, "first_bad_step": self.first_bad_step}

    def load_state_dict(self, state: dict) -> None:
        self.steps.update({k: int(v) for k, v in state.get("steps", {}).items() if k in self.steps})
        self.in_a_row = int(state.get("in_a_row", 0))
        self.first_bad_step = state.get("first_bad_step")
