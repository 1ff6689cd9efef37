"""The pretraining loop: shards -> batch -> objectives -> engine step -> logs / checkpoints.

One optimizer step consumes `grad_accum_steps` micro-batches on every rank. The objective (vanilla METER or EPIC)
returns the VLM's total loss for a micro-batch; objectives that own further engines (the EPIC generator) step them
inside `losses()` so that each engine has its own backward, step and loss scaler.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from epic.config import Config, config_to_dict, dump_config
from epic.engine import checkpoint as ckpt
from epic.engine.logger import RunLogger, StepTimer, guess_peak_tflops, log_console
from epic.engine.metrics import DeviceMetrics, StepLosses
from epic.engine.setup import (BatchMath, EngineSpec, create_engine, derive_batch_math, engine_dtype, load_ds_config,
                               loss_scale_of, optimizer_spec, resolve_ds_config)


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)  # mean VLM loss per optimizer step, this run only
    checkpoint: Optional[str] = None
    preempted: bool = False


# Floating batch entries that keep their dtype (probabilities the objectives read in fp32, e.g. the cached saliency)
KEEP_DTYPE_KEYS = ("saliency_alpha",)


def move_batch(batch: dict, device: torch.device, float_dtype: torch.dtype) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if value.is_floating_point() and key not in KEEP_DTYPE_KEYS:
                value = value.to(float_dtype)
        out[key] = value
    return out


def pick_resume_checkpoint(run_dir: str, resume: str) -> Optional[Path]:
    """`auto`: newest complete checkpoint in run.dir if any; `none`: refuse to resume; else an explicit path."""
    if resume == "none":
        found = ckpt.find_checkpoint(run_dir) if Path(run_dir).exists() else None
        if found is not None:
            raise ckpt.CheckpointError(
                f"--resume none, but {run_dir} already holds checkpoint {found}. Use another run.dir, or "
                f"--resume auto to continue it.")
        return None
    if resume == "auto":
        return ckpt.find_checkpoint(run_dir) if Path(run_dir).exists() else None
    found = ckpt.find_checkpoint(resume)
    if found is None:
        raise ckpt.CheckpointError(f"--resume {resume}: no complete checkpoint there")
    return found


class Trainer:
    """The loop; what it trains comes from its construction hooks (``epic.wiring.PretrainTrainer`` for pretraining,
    epic/finetune.py for the downstream tasks), so the engine names no model family and no objective."""

    def __init__(self, cfg: Config, ds_config_path: str, dist_info, resume: str = "auto") -> None:
        self.cfg = cfg
        self.rank, self.world_size = dist_info.rank, dist_info.world_size
        self.device = torch.device("cuda", dist_info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        self.batch: BatchMath = derive_batch_math(cfg.train.global_batch_size, cfg.data.micro_batch_size,
                                                  self.world_size)
        self.ds_config = resolve_ds_config(load_ds_config(ds_config_path), self.batch, cfg.train.grad_clip,
                                           on_cpu=self.device.type == "cpu")
        self.paths = self.resolve_paths()
        self.resume_from = pick_resume_checkpoint(cfg.run.dir, resume)

    # -- construction hooks (epic.wiring.PretrainTrainer; epic/finetune.py for the downstream tasks) ------------
    def resolve_paths(self):
        """Data paths (called in __init__)."""
        raise NotImplementedError

    def build_model(self):
        """(model, tokenizer); called after the seed is set, before the optimizer exists."""
        raise NotImplementedError

    def build_objective(self):
        """The objective (protocol: docs/CONTRACTS.md), with the engines of its extra modules attached."""
        raise NotImplementedError

    def build_loader(self, data_state):
        raise NotImplementedError

    def evaluate_during_training(self) -> dict:
        """Metrics every ``train.eval_every`` steps (all ranks take part); {} for none."""
        return {}

    def setup(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        self.model, self.tokenizer = self.build_model()
        self.engine = create_engine(EngineSpec(self.model, optimizer_spec(cfg.train)), self.ds_config, self.batch,
                                    cfg.train.grad_clip, on_cpu=self.device.type == "cpu")
        self.dtype = engine_dtype(self.ds_config)
        self.objective = self.build_objective()
        self.engines = {"vlm": self.engine, **self.objective.extra_engines()}
        # Per-rank randomness of the objectives (ITM negatives, EPIC sampling) lives in its own generator.
        self.rng = torch.Generator(device="cpu").manual_seed(cfg.run.seed * 100_003 + self.rank)
        torch.manual_seed(cfg.run.seed * 7919 + self.rank)  # dropout differs across ranks
        self.step = 0
        data_state = None
        if self.resume_from is not None:
            trainer_state, rank_state = ckpt.load_checkpoint(self.resume_from, self.engines, self.world_size)
            self.step = int(trainer_state["step"])
            data_state = rank_state["data"]
            ckpt.restore_rng_state(rank_state["rng"], {"objective": self.rng})
            self.objective.load_state_dict(rank_state.get("objective", {}))
            log_console(f"resumed from {self.resume_from} at step {self.step}", self.rank)
        self.loader = self.build_loader(data_state)
        Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            dump_config(cfg, Path(cfg.run.dir) / "config.yaml")
        self.logger = RunLogger(cfg.run.dir, enabled=self.rank == 0, max_steps=cfg.train.max_steps)
        # FLOPs of one training sample (forward + backward), counted once on the meta device (exact, no memory)
        self.flops_per_sample = self.objective.flops_per_sample(cfg) if self.rank == 0 else 0.0
        self.peak_tflops = cfg.train.peak_tflops or guess_peak_tflops()

    # -- checkpoints ----------------------------------------------------------------------------------------
    def save(self) -> Path:
        rank_state = {"rng": ckpt.capture_rng_state({"objective": self.rng}), "data": self.loader.state_dict(),
                      "objective": self.objective.state_dict()}
        trainer_state = {"step": self.step, "world_size": self.world_size,
                         "samples_seen": self.step * self.batch.global_batch_size,
                         "config": config_to_dict(self.cfg), "time": time.time()}
        return ckpt.save_checkpoint(Path(self.cfg.run.dir) / "checkpoints", self.step, self.engines, rank_state,
                                    trainer_state, self.cfg.train.keep_last)

    # -- one optimizer step ---------------------------------------------------------------------------------
    def _micro_step(self, batch: dict, timer: StepTimer, averager: DeviceMetrics) -> torch.Tensor:
        """One micro-batch, without a host synchronisation of ours: the loss, its non-finite flag and the metrics
        stay on the device until the next log line (epic/engine/metrics.py)."""
        out = self.objective.losses(self.engine.module, batch, self.rng, self.step)
        timer.stop("forward")
        loss = out["loss"]
        # A non-finite loss is back-propagated: DeepSpeed's overflow check then skips the whole optimizer step on
        # every rank (nothing is applied; the lr schedule does not advance). It is counted at log time.
        detached = self.step_losses.add_micro(loss)
        self.engine.backward(loss)
        timer.stop("backward")
        self.engine.step()
        timer.stop("step")
        averager.add({k: v for k, v in out.items() if k != "loss"})
        averager.add({"loss": detached})
        return detached

    def _after_optimizer_step(self, skipped_at_start: int) -> None:
        """A model with per-step state besides its weights (ALBEF's momentum encoders and distillation ramp) updates
        it after an optimizer step that was taken; a step DeepSpeed skipped on overflow changed no weight."""
        hook = getattr(self.engine.module, "after_optimizer_step", None)
        if hook is not None and self.engine.skipped_steps == skipped_at_start:
            hook()

    def train(self, preemption=None) -> TrainResult:
        """Train to `train.max_steps` (or `stop_at_step`). `preemption`: a PreemptionHandler installed early."""
        cfg = self.cfg
        from epic.engine.preemption import PreemptionHandler

        preemption = preemption or PreemptionHandler()
        result = TrainResult(step=self.step)
        averager, timer = DeviceMetrics(), StepTimer()
        self.step_losses = StepLosses()
        self.first_step = self.step
        skipped_before = self.engine.skipped_steps
        data_iter = iter(self.loader)
        log_console(f"training: world {self.world_size}, micro batch {self.batch.micro_batch_size}, grad accum "
                    f"{self.batch.grad_accum_steps}, global batch {self.batch.global_batch_size}, "
                    f"{self.dtype}, from step {self.step} to {cfg.train.max_steps}", self.rank)
        window_start, window_samples = time.perf_counter(), 0
        try:
            stop_at = min(cfg.train.stop_at_step or cfg.train.max_steps, cfg.train.max_steps)
            while self.step < stop_at:
                step_losses = []
                will_log = (self.step + 1) % cfg.train.log_every == 0 or self.step + 1 == stop_at
                timer.active = will_log  # phase times need device syncs: measured on the step before a log line
                skipped_at_start = self.engine.skipped_steps
                for _ in range(self.batch.grad_accum_steps):
                    timer.start()
                    batch = next(data_iter)
                    batch = move_batch(batch, self.device, self.dtype)
                    timer.stop("data")
                    step_losses.append(self._micro_step(batch, timer, averager))
                    window_samples += self.batch.micro_batch_size * self.world_size
                self._after_optimizer_step(skipped_at_start)
                self.step += 1
                self.step_losses.add_step(step_losses)
                if will_log:
                    result.losses.extend(self.step_losses.flush())  # the one host read of the window
                    elapsed = time.perf_counter() - window_start
                    self._log(averager, timer, window_samples / elapsed, skipped_before)
                    window_start, window_samples = time.perf_counter(), 0
                if cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
                    self._evaluate()
                saved = self.step % cfg.train.save_every == 0 and self.step < stop_at
                if saved:
                    result.checkpoint = str(self.save())
                if preemption.should_stop():
                    result.losses.extend(self.step_losses.flush())
                    if not saved:
                        result.checkpoint = str(self.save())
                    result.preempted = True
                    log_console(f"preempted: checkpoint saved at step {self.step}", self.rank)
                    break
            else:
                if self.step > self.first_step:
                    result.checkpoint = str(self.save())
                else:
                    log_console(f"nothing to do: run.dir is already at step {self.step}", self.rank)
        finally:
            preemption.close()
            self.logger.close()
        result.step = self.step
        return result

    # -- logging / evaluation -------------------------------------------------------------------------------
    def _log(self, averager: DeviceMetrics, timer: StepTimer, samples_per_s: float, skipped_before: int) -> None:
        metrics = averager.pop()
        times = timer.pop()
        values = {f"train/{k}": v for k, v in metrics.items()}
        scheduler = self.engine.lr_scheduler
        values["train/lr"] = self.cfg.train.lr * scheduler.lr_lambdas[0](scheduler.last_epoch)
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None and math.isfinite(float(grad_norm)):
            values["train/grad_norm"] = float(grad_norm)
        scale = loss_scale_of(self.engine) if self.dtype == torch.float16 else None
        if scale is not None:
            values["train/loss_scale"] = scale
        values["train/skipped_steps"] = float(self.engine.skipped_steps - skipped_before)
        values["train/nonfinite_losses"] = float(self.step_losses.nonfinite_total)
        values["perf/samples_per_s"] = samples_per_s
        if self.flops_per_sample:
            tflops = self.flops_per_sample * samples_per_s / self.world_size / 1e12
            values["perf/tflops_per_device"] = tflops
            values["perf/flops_per_sample"] = float(self.flops_per_sample)
            if self.peak_tflops:
                values["perf/mfu"] = tflops / self.peak_tflops
        if self.device.type == "cuda":
            values["perf/peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        total_time = sum(times.values()) or 1.0
        for phase, seconds in times.items():
            values[f"time/{phase}_share"] = seconds / total_time
        for reason, count in self.loader.skip_counts().items():
            values[f"data/skipped_{reason}"] = float(count)
        for key, value in self.objective.log_values(self.step).items():
            values[key] = value
        for tag, image in self.objective.images(self.step).items():
            self.logger.image(self.step, tag, image)
        self.logger.scalars(self.step, values)
        self.logger.console(self.step, values)

    def _evaluate(self) -> None:
        metrics = self.evaluate_during_training()
        if metrics:
            self.logger.scalars(self.step, {f"eval/{k}": v for k, v in metrics.items()})
            log_console(f"eval step {self.step}: " + " ".join(f"{k}={v:.2f}" for k, v in metrics.items()),
                        self.rank)
        self.engine.module.train()
