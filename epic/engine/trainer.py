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

import numpy as np
import torch
import torch.distributed as dist

from epic import faults
from epic.config import Config, config_to_dict, dump_config
from epic.dist import heartbeat
from epic.engine import checkpoint as ckpt
from epic.engine.logger import RunLogger, SampleRecorder, StepTimer, guess_peak_tflops, log_console
from epic.engine.metrics import DeviceMetrics, StepLosses
from epic.engine.nonfinite import NonfiniteGuard
from epic.engine.setup import (BatchMath, EngineSpec, SetupError, create_engine, derive_batch_math, engine_dtype,
                               load_ds_config, loss_scale_of, optimizer_spec, resolve_ds_config)


# The loss each engine is trained on, as named in the objective's output (a non-finite one skips that engine's step)
ENGINE_LOSSES = {"vlm": "loss", "generator": "loss_gen"}
_OBJECTIVE_RNG, _DROPOUT_RNG = 1, 2  # purposes folded into the per-micro-batch seeds


def batch_rows(batch: dict, default: int) -> int:
    """Training samples (image-text rows) in a micro-batch: the caption loader's data.micro_batch_size, or an
    objective-drawn batch's own size (X-VLM's region batches: data.regions.micro_batch_size). A shape, no sync;
    ``default`` for a batch without text rows."""
    rows = batch.get("input_ids")
    return int(rows.shape[0]) if isinstance(rows, torch.Tensor) else default


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)  # mean VLM loss per optimizer step, this run only
    checkpoint: Optional[str] = None
    preempted: bool = False
    stopped_nonfinite: bool = False  # train.max_nonfinite_steps steps in a row had a non-finite loss
    start_step: int = 0  # the step this run started from (the resumed checkpoint's, or 0)


# Floating batch entries that keep their dtype (probabilities the objectives read in fp32, e.g. the cached saliency)
KEEP_DTYPE_KEYS = ("saliency_alpha",)


def micro_batch_seed(seed: int, purpose: int, global_micro_batch: int) -> int:
    """The seed of one random decision of global micro-batch j: a run is a function of its global sample sequence,
    whatever the number of ranks (j = (step x grad_accum + micro step) x world size + rank)."""
    words = np.random.SeedSequence([seed, purpose, global_micro_batch]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def _mean_across_ranks_dict(values: dict) -> dict:
    """Every rank's averages -> the mean over ranks (the same micro-batch count on each: the global mean)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def _sum_across_ranks_dict(values: dict) -> dict:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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
    candidates = resume_candidates(run_dir, resume)
    return candidates[0] if candidates else None


def resume_candidates(run_dir: str, resume: str) -> list[Path]:
    """The checkpoints to try, best first (`auto`: every complete one in run.dir, newest first, so that a damaged
    newest one falls back to the one before; an explicit PATH: only that one)."""
    if resume == "none":
        found = ckpt.find_checkpoint(run_dir) if Path(run_dir).exists() else None
        if found is not None:
            raise ckpt.CheckpointError(
                f"--resume none, but {run_dir} already holds checkpoint {found}. Use another run.dir, or "
                f"--resume auto to continue it.")
        return []
    if resume == "auto":
        return ckpt.resume_candidates(run_dir) if Path(run_dir).exists() else []
    found = ckpt.find_checkpoint(resume)
    if found is None:
        raise ckpt.CheckpointError(f"--resume {resume}: no complete checkpoint there")
    return [found]


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
        self.resume_candidates = resume_candidates(cfg.run.dir, resume)
        self.resume_from = self.resume_candidates[0] if self.resume_candidates else None

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

    def merge_data_states(self, states: list) -> dict:
        """The data positions of every rank of a run with another world size -> one state for build_loader."""
        from epic.data.loader import merge_train_states

        return merge_train_states(states)

    def setup(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        self.model, self.tokenizer = self.build_model()
        self.engine = create_engine(EngineSpec(self.model, optimizer_spec(cfg.train)), self.ds_config, self.batch,
                                    cfg.train.grad_clip, on_cpu=self.device.type == "cpu")
        self.dtype = engine_dtype(self.ds_config)
        self.objective = self.build_objective()
        self.engines = {"vlm": self.engine, **self.objective.extra_engines()}
        # Randomness of a step (ITM negatives, masks, generator sampling, dropout) is seeded per global
        # micro-batch in _micro_step; this generator only exists for callers that read trainer.rng.
        self.rng = torch.Generator(device="cpu").manual_seed(cfg.run.seed * 100_003 + self.rank)
        self.guard = NonfiniteGuard([n for n in ENGINE_LOSSES if n in self.engines], cfg.train.max_nonfinite_steps,
                                    self.device)
        self.step = 0
        data_state, self.resumed_from = None, None
        if self.resume_candidates:
            data_state = self._resume()
        try:
            self.loader = self.build_loader(data_state)
        except ValueError as err:
            if data_state is None:
                raise SetupError(str(err)) from err
            raise ckpt.CheckpointError(f"cannot continue the data stream of {self.resumed_from}: {err}") from err
        Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            dump_config(cfg, Path(cfg.run.dir) / "config.yaml")
        # resuming from step k: rows after k (logged by the interrupted run, recomputed now) are dropped
        self.logger = RunLogger(cfg.run.dir, enabled=self.rank == 0, max_steps=cfg.train.max_steps,
                                resume_step=self.step)
        self.recorder = SampleRecorder(cfg.run.dir, self.rank, self.step) if cfg.train.record_samples else None
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # rank 0 has truncated the logs before any rank appends
        # FLOPs of one training sample (forward + backward), counted once on the meta device (exact, no memory)
        self.flops_per_sample = self.objective.flops_per_sample(cfg) if self.rank == 0 else 0.0
        self.peak_tflops = cfg.train.peak_tflops or guess_peak_tflops()

    def _resume(self):
        """Load the newest checkpoint that loads on every rank; the data state for build_loader."""
        self.resumed_from, trainer_state, rank_states = ckpt.load_newest(
            self.resume_candidates, self.engines, self.world_size, log=lambda m: log_console(m, self.rank))
        self.step = int(trainer_state["step"])
        saved_world = int(trainer_state["world_size"])
        self.guard.load_state_dict(trainer_state.get("nonfinite", {}))
        if saved_world == self.world_size:
            own = rank_states[0]
            data_state = own["data"]
            ckpt.restore_rng_state(own["rng"], {"objective": self.rng})
            self.objective.load_state_dict(own.get("objective", {}))
        else:
            try:
                data_state = self.merge_data_states([state["data"] for state in rank_states])
            except ValueError as err:
                raise ckpt.CheckpointError(f"{self.resumed_from} was written by {saved_world} ranks and its data "
                                           f"stream cannot be re-split for {self.world_size}: {err}") from err
            if self.rank < saved_world:  # accumulators of the objective's logs (EPIC measurements)
                self.objective.load_state_dict(rank_states[self.rank].get("objective", {}))
            log_console(f"elastic resume: {self.resumed_from} was written by {saved_world} ranks, continuing on "
                        f"{self.world_size} (engines from DeepSpeed universal checkpoints, {data_state['streams']} "
                        f"data streams re-split, global batch {self.batch.global_batch_size} kept with "
                        f"{self.batch.grad_accum_steps} micro-batches per rank and step)", self.rank)
        # printed only now that every rank has loaded (load_newest agrees on success across ranks)
        log_console(f"resumed from {self.resumed_from} at step {self.step}", self.rank)
        return data_state

    # -- checkpoints ----------------------------------------------------------------------------------------
    def save(self) -> Path:
        rank_state = {"rng": ckpt.capture_rng_state({"objective": self.rng}), "data": self.loader.state_dict(),
                      "objective": self.objective.state_dict()}
        trainer_state = {"step": self.step, "world_size": self.world_size,
                         "samples_seen": self.step * self.batch.global_batch_size,
                         "nonfinite": self.guard.state_dict(),
                         "config": config_to_dict(self.cfg), "time": time.time()}
        return ckpt.save_checkpoint(Path(self.cfg.run.dir) / "checkpoints", self.step, self.engines, rank_state,
                                    trainer_state, self.cfg.train.keep_last)

    # -- one optimizer step ---------------------------------------------------------------------------------
    def _micro_step(self, batch: dict, timer: StepTimer, averager: DeviceMetrics, micro: int) -> torch.Tensor:
        """One micro-batch, without a host synchronisation of ours: the loss, its non-finite flags and the metrics
        stay on the device (epic/engine/metrics.py, epic/engine/nonfinite.py)."""
        rng = self._seed_micro_batch(micro)
        out = self.objective.losses(self.engine.module, batch, rng, self.step)
        timer.stop("forward")
        loss = faults.poison("vlm", self.step + 1, out["loss"])
        # A non-finite loss is back-propagated: DeepSpeed's overflow check then skips the whole optimizer step on
        # every rank (nothing is applied; the lr schedule does not advance). The guard counts it on the device.
        for name, key in ENGINE_LOSSES.items():
            if name in self.guard.names and key in out:
                self.guard.observe(name, loss if name == "vlm" else out[key])
        detached = self.step_losses.add_micro(loss)
        self.engine.backward(loss)
        timer.stop("backward")
        self.engine.step()
        timer.stop("step")
        averager.add({k: v for k, v in out.items() if k != "loss"})
        averager.add({"loss": detached})
        return detached

    def _next_batch(self, data_iter) -> dict:
        """The loader's next batch, unless the objective draws this step's data itself (optional protocol hook
        ``draw_batch(step) -> dict | None``, e.g. X-VLM's region steps): the loader then stays where it is."""
        draw = getattr(self.objective, "draw_batch", None)
        own = draw(self.step) if draw is not None else None
        return next(data_iter) if own is None else own

    def global_micro_batch(self, micro: int) -> int:
        """Index j of this rank's micro-batch `micro` of the current step among all ranks' micro-batches."""
        return (self.step * self.batch.grad_accum_steps + micro) * self.world_size + self.rank

    def _seed_micro_batch(self, micro: int) -> torch.Generator:
        """Seed dropout and return the objective's generator for this micro-batch, keyed to its global index."""
        j = self.global_micro_batch(micro)
        torch.manual_seed(micro_batch_seed(self.cfg.run.seed, _DROPOUT_RNG, j))
        return torch.Generator(device="cpu").manual_seed(micro_batch_seed(self.cfg.run.seed, _OBJECTIVE_RNG, j))

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
        result = TrainResult(step=self.step, start_step=self.step)
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
                heartbeat(self.step + 1)  # read only when a collective fails, to name the rank that stopped
                step_losses = []
                will_log = (self.step + 1) % cfg.train.log_every == 0 or self.step + 1 == stop_at
                timer.active = will_log  # phase times need device syncs: measured on the step before a log line
                skipped_at_start = self.engine.skipped_steps
                for micro in range(self.batch.grad_accum_steps):
                    timer.start()
                    batch = self._next_batch(data_iter)
                    if self.recorder is not None and "keys" in batch:
                        self.recorder.add(self.step + 1, self.global_micro_batch(micro), batch["keys"])
                    batch = move_batch(batch, self.device, self.dtype)
                    timer.stop("data")
                    step_losses.append(self._micro_step(batch, timer, averager, micro))
                    # region batches (drawn by the objective) have their own size
                    window_samples += batch_rows(batch, self.batch.micro_batch_size) * self.world_size
                self._after_optimizer_step(skipped_at_start)
                self.step += 1
                bad = self.guard.end_step(self.step)  # the one host read of a step
                self.step_losses.add_step(step_losses)
                faults.at("step", self.step)
                if will_log:
                    result.losses.extend(self.step_losses.flush())
                    elapsed = time.perf_counter() - window_start
                    self._log(averager, timer, window_samples / elapsed, skipped_before)
                    window_start, window_samples = time.perf_counter(), 0
                if cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
                    self._evaluate()
                saved = self.step % cfg.train.save_every == 0 and self.step < stop_at
                if saved:
                    result.checkpoint = str(self.save())
                if self.guard.should_stop:
                    result.losses.extend(self.step_losses.flush())
                    result.checkpoint = result.checkpoint if saved else str(self.save())
                    result.stopped_nonfinite = True
                    self._report_nonfinite_stop(bad, result.checkpoint)
                    break
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
            if self.recorder is not None:
                self.recorder.close()
        result.step = self.step
        return result

    def _report_nonfinite_stop(self, engines: list[str], checkpoint: str) -> None:
        first = self.guard.first_bad_step
        log_console(f"stopping: {self.guard.in_a_row} optimizer steps in a row (steps {first} to {self.step}) had a "
                    f"non-finite loss ({', '.join(engines)}; train.max_nonfinite_steps="
                    f"{self.cfg.train.max_nonfinite_steps}). DeepSpeed skipped those updates, so {checkpoint} holds "
                    f"the weights of step {first - 1} for them; lower the lr or check the data before resuming",
                    self.rank)

    # -- logging / evaluation -------------------------------------------------------------------------------
    def _log(self, averager: DeviceMetrics, timer: StepTimer, samples_per_s: float, skipped_before: int) -> None:
        metrics = _mean_across_ranks_dict(averager.pop())  # logged values are of the global batch, not rank 0's
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
        for name, count in self.guard.steps.items():
            values[f"train/nonfinite_steps_{name}"] = float(count)
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
        for reason, count in _sum_across_ranks_dict(self.loader.skip_counts()).items():  # all ranks
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
