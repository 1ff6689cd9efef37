"""Rank-0 logging: TensorBoard scalars/images under `run.dir/tb` and a console line with ETA."""
from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch

# Peak dense bf16/fp16 tensor-core TFLOP/s per device, for MFU when train.peak_tflops is 0.
PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "A10": 125.0, "V100": 125.0, "L40": 181.0}


def guess_peak_tflops() -> float:
    if not torch.cuda.is_available():
        return 0.0
    name = torch.cuda.get_device_name()
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return 0.0


class StepTimer:
    """Wall time per phase (data wait / forward / backward / step), synchronising CUDA at phase ends.

    Only while ``active``: the trainer turns it on for the optimizer step before each log line, so the other
    steps run without these host synchronisations (the shares are then those of that step).
    """

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._start: Optional[float] = None
        self.active = True

    def start(self) -> None:
        if self.active:
            self._start = time.perf_counter()

    def stop(self, phase: str) -> None:
        if not self.active or self._start is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.totals[phase] += now - self._start
        self._start = now

    def pop(self) -> dict[str, float]:
        totals, self.totals = dict(self.totals), defaultdict(float)
        return totals


class MetricAverager:
    """Averages scalar metrics over the micro-batches between two log lines."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, metrics: dict) -> None:
        for key, value in metrics.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    continue
                value = value.item()
            if isinstance(value, (int, float)):
                self.sums[key] += float(value)
                self.counts[key] += 1

    def pop(self) -> dict[str, float]:
        out = {k: self.sums[k] / self.counts[k] for k in self.sums}
        self.sums.clear()
        self.counts.clear()
        return out


class RunLogger:
    def __init__(self, run_dir: str, enabled: bool, max_steps: int) -> None:
        self.enabled = enabled
        self.max_steps = max_steps
        self.writer = None
        self._t0 = time.time()
        self._step0: Optional[int] = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))
            self.jsonl = open(Path(run_dir) / "metrics.jsonl", "a")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()

    def image(self, step: int, tag: str, image_hwc) -> None:
        if self.enabled:
            self.writer.add_image(tag, image_hwc, step, dataformats="HWC")

    def console(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self._step0 is None:
            self._step0, self._t0 = step, time.time()
            eta = "?"
        else:
            rate = (time.time() - self._t0) / max(step - self._step0, 1)
            eta = _fmt_seconds(rate * (self.max_steps - step))
        shown = ["loss", "loss_itm", "loss_mlm", "loss_itc", "loss_gen", "itm_acc", "mlm_acc", "lr", "grad_norm",
                 "samples_per_s"]
        parts = [f"{k.split('/')[-1]}={values[k]:.4g}" for k in sorted(values)
                 if k.split("/")[-1] in shown]
        print(f"step {step}/{self.max_steps} " + " ".join(parts) + f" eta {eta}", flush=True)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


def _fmt_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def log_console(message: str, rank: int = 0) -> None:
    if rank == 0:
        print(message, file=sys.stdout, flush=True)
