"""Preemption and time limits: turn a signal into a clean "save a checkpoint and exit 0" at a step boundary.

Slurm sends SIGUSR1 `grace` seconds before a job's time limit or a preemption (`#SBATCH --signal=B:USR1@grace`; the
launcher in slurm/ forwards it to every task), and SIGTERM on `scancel`. The handler only records the signal; the
trainer asks `should_stop()` after each optimizer step, and because a signal may reach the ranks at different
steps, the flag is all-reduced (MAX) so that every rank stops after the same step:

    preemption = PreemptionHandler()
    for step in ...:
        ... optimizer step ...
        if preemption.should_stop():
            save_checkpoint(...)                          # collective: every rank
            print(f"preempted: checkpoint saved at step {step}")
            return 0
    preemption.close()
"""
from __future__ import annotations

import signal
import threading
from typing import Iterable, Optional

import torch
import torch.distributed as dist

DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionHandler:
    """Records SIGUSR1/SIGTERM (by default) in a flag; `should_stop()` agrees on it across ranks."""

    def __init__(self, signals: Iterable[int] = DEFAULT_SIGNALS):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler must be created in the main thread (Python only delivers signals "
                               "there); create it in the trainer's main function, not in a data-loader thread")
        self.signals = tuple(signal.Signals(s) for s in signals)
        self.received: Optional[signal.Signals] = None  # the first signal seen
        self._previous = {}
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        # Only set a flag: the trainer may be in the middle of a collective or a CUDA call.
        if self.received is None:
            self.received = signal.Signals(signum)

    @property
    def requested(self) -> bool:
        """This rank got a signal (no communication)."""
        return self.received is not None

    def should_stop(self) -> bool:
        """True on every rank when any rank got a signal. Collective when torch.distributed is initialised."""
        local = 1 if self.requested else 0
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return bool(local)
        flag = torch.tensor([local], dtype=torch.int32, device=_collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        """Put back the handlers that were installed before (idempotent)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self) -> "PreemptionHandler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo (CPU runs) reduces CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
