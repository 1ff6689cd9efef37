"""Rank-0 logging: TensorBoard scalars/images under `run.dir/tb`, `run.dir/metrics.jsonl`, a console line with ETA.

A run resumed from step k first drops what the interrupted run logged after k (those steps are computed again):
rows of metrics.jsonl with step > k, and TensorBoard events from step k + 1 on (SummaryWriter's purge_step), so
that every step has exactly one value."""
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


def truncate_jsonl(path: Path, last_step: int) -> int:
    """Keep the rows of a JSON-lines log with "step" <= last_step (and drop a torn last line); rows dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            dropped += 1  # written half when the job was killed
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > last_step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    return dropped


class RunLogger:
    def __init__(self, run_dir: str, enabled: bool, max_steps: int, resume_step: Optional[int] = None) -> None:
        """resume_step: the step this run starts from; later rows of an earlier run are dropped first."""
        self.enabled = enabled
        self.max_steps = max_steps
        self.writer = None
        self._t0 = time.time()
        self._step0: Optional[int] = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            jsonl = Path(run_dir) / "metrics.jsonl"
            purge = None
            if resume_step is not None:
                truncate_jsonl(jsonl, resume_step)
                purge = resume_step + 1  # events at steps >= purge_step are dropped by TensorBoard's readers
            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"), purge_step=purge)
            self.jsonl = open(jsonl, "a")

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


class SampleRecorder:
    """`train.record_samples`: one row per micro-batch of this rank, {"step", "j" (global micro-batch), "keys"},
    in run.dir/samples/rank_R.jsonl. Resuming from step k drops every rank file's rows after k first (rank 0;
    the trainer holds a barrier before anyone appends), so the files always hold each global micro-batch once."""

    def __init__(self, run_dir: str, rank: int, resume_step: int) -> None:
        folder = Path(run_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            for path in sorted(folder.glob("rank_*.jsonl")):
                truncate_jsonl(path, resume_step)
        self.path = folder / f"rank_{rank:05d}.jsonl"
        self._file = None

    def add(self, step: int, global_micro_batch: int, keys) -> None:
        if self._file is None:
            self._file = open(self.path, "a")
        self._file.write(json.dumps({"step": step, "j": global_micro_batch, "keys": list(keys)}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def read_samples(run_dir: str) -> list[dict]:
    """Every recorded micro-batch of a run (all rank files), ordered by global micro-batch index j."""
    rows = []
    for path in sorted((Path(run_dir) / "samples").glob("rank_*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda row: row["j"])


def _fmt_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def log_console(message: str, rank: int = 0) -> None:
    if rank == 0:
        print(message, file=sys.stdout, flush=True)
