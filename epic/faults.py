"""Fault injection for the fault drill (tools/fault_drill.py, tests/test_faults.py): off unless EPIC_FAULT is set.

    EPIC_FAULT="kill:save_before_complete:6"        SIGKILL at that point of the save of step 6 (every rank there)
    EPIC_FAULT="kill:step:5:1"                      SIGKILL rank 1 only, right after optimizer step 5
    EPIC_FAULT="stall:step:5:1"                     rank 1 sleeps forever after step 5 (a hung rank)
    EPIC_FAULT="enospc:save_engines:6"              the save of step 6 fails like a full disk: the next torch.save
                                                    writes half its bytes, then raises OSError(ENOSPC)
    EPIC_FAULT="nan:generator:3:2"                  the generator's loss is NaN at steps 3 and 4 (k=2 steps)

Several faults: separate them with commas. Fields: kind:point:step[:rank|:k]. Points in the trainer: `step`
(after an optimizer step); in save_checkpoint: `save_begin` (before any engine file), `save_between` (after the
first engine, before the next one / the rank files), `save_before_complete`, `save_before_latest`, and
`save_engines` (enospc only: during the engine files). `nan` engines: `vlm`, `generator`. Steps count optimizer
steps from 1; for `nan` and inside a save, `step` is the step being computed / saved.
"""
from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass
from typing import Optional

ENV = "EPIC_FAULT"
KINDS = ("kill", "stall", "enospc", "nan")


@dataclass(frozen=True)
class Fault:
    kind: str
    point: str
    step: int
    extra: Optional[int] = None  # kill/stall: the only rank hit (None = every rank); nan: number of steps k


def parse_faults(text: Optional[str]) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        fields = item.split(":")
        if len(fields) not in (3, 4) or fields[0] not in KINDS:
            raise ValueError(f"{ENV}: cannot parse '{item}' (expected kind:point:step[:rank|:k], kind one of {KINDS})")
        try:
            faults.append(Fault(fields[0], fields[1], int(fields[2]), int(fields[3]) if len(fields) == 4 else None))
        except ValueError:
            raise ValueError(f"{ENV}: '{item}': step and rank/k must be integers") from None
    return faults


def active() -> list[Fault]:
    return parse_faults(os.environ.get(ENV))


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def at(point: str, step: int) -> None:
    """Kill or stall this process if a fault is set for `point` at `step` (and this rank)."""
    for fault in active():
        if fault.point != point or fault.step != step or fault.kind not in ("kill", "stall"):
            continue
        if fault.extra is not None and fault.extra != _rank():
            continue
        print(f"[{ENV}] {fault.kind} rank {_rank()} at {point} of step {step}", flush=True)
        if fault.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        while True:  # stall: a rank stuck in a hung device call or a dead NFS mount
            time.sleep(3600)


def disk_full(point: str, step: int) -> bool:
    return any(f.kind == "enospc" and f.point == point and f.step == step for f in active())


class FullDisk:
    """Within the block, torch.save writes half of what it is given and raises OSError(ENOSPC), like a full disk."""

    def __enter__(self):
        import torch

        self._torch, self._save = torch, torch.save

        def save(obj, f, *args, **kwargs):
            import io

            buffer = io.BytesIO()
            self._save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            with open(f, "wb") as out:
                out.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

        torch.save = save
        return self

    def __exit__(self, *exc) -> None:
        self._torch.save = self._save


def poison(engine: str, step: int, loss):
    """`loss` times NaN when a `nan` fault covers this engine at this step (else `loss` itself)."""
    for fault in active():
        if fault.kind == "nan" and fault.point == engine and fault.step <= step < fault.step + (fault.extra or 1):
            return loss * float("nan")
    return loss
