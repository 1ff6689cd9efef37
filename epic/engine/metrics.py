"""Training metrics kept on the device between log lines, so that the hot path never waits for the GPU.

Reading a CUDA tensor on the host (``.item()``, ``float()``, ``bool()``) or an all-reduce whose result is read
stalls the CPU until the GPU has caught up, which empties the launch queue every micro-step. Here the per-micro-step
values (losses, accuracies, the non-finite flag) are summed as device tensors; ``pop`` moves them all to the host in
one copy, with one all-reduce per reduction, when a log line is written.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def read_scalars(values: list) -> list[float]:
    """Device scalars and Python numbers -> floats, with one device-to-host copy for all the tensors."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return [float(v) for v in values]
    device = tensors[0].device
    host = iter(torch.stack([t.detach().to(device, torch.float64).reshape(()) for t in tensors]).tolist())
    return [next(host) if isinstance(v, torch.Tensor) else float(v) for v in values]


class DeviceMetrics:
    """Means of scalar metrics over the micro-batches since the last ``pop`` (local to this rank)."""

    def __init__(self) -> None:
        self.sums: dict = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: dict) -> None:
        """Never synchronises: tensors are summed on their device (detached, fp32), numbers on the host."""
        for key, value in metrics.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    continue
                value = value.detach().float().reshape(())
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] = self.counts.get(key, 0) + 1

    def pop(self) -> dict[str, float]:
        keys = list(self.sums)
        values = read_scalars([self.sums[k] for k in keys])
        out = {k: v / self.counts[k] for k, v in zip(keys, values)}
        self.sums, self.counts = {}, {}
        return out


class StepLosses:
    """The per-optimizer-step loss (mean over micro-batches and ranks) and the non-finite micro-batch count, both
    kept on the device and reduced across ranks only when read (``flush``)."""

    def __init__(self) -> None:
        self._steps: list[torch.Tensor] = []
        self._nonfinite: list[torch.Tensor] = []
        self.nonfinite_total = 0  # micro-batches with a non-finite loss on any rank, since training started

    def add_micro(self, loss: torch.Tensor) -> torch.Tensor:
        """Record one micro-batch's loss; returns it detached (fp32). No synchronisation."""
        loss = loss.detach().float().reshape(())
        self._nonfinite.append((~torch.isfinite(loss)).float())
        return loss

    def add_step(self, micro_losses: list[torch.Tensor]) -> None:
        self._steps.append(torch.stack(micro_losses).mean())

    def flush(self) -> list[float]:
        """Step losses since the last flush (averaged over ranks); updates ``nonfinite_total``. One host read."""
        if not self._steps and not self._nonfinite:
            return []
        device = (self._steps or self._nonfinite)[0].device
        steps = torch.stack(self._steps).double() if self._steps else torch.zeros(0, device=device, dtype=torch.float64)
        flags = torch.stack(self._nonfinite).double() if self._nonfinite else torch.zeros(0, device=device,
                                                                                           dtype=torch.float64)
        if _distributed():
            dist.all_reduce(steps)
            steps /= dist.get_world_size()
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # a micro-batch counts once if any rank saw it
        host = torch.cat([flags.sum().reshape(1), steps]).tolist()
        self._steps, self._nonfinite = [], []
        self.nonfinite_total += int(host[0])
        return host[1:]

    def pending(self) -> Optional[int]:
        return len(self._steps)
