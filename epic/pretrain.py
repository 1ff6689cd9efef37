"""Pretrain METER (vanilla ITM + MLM, or EPIC) under DeepSpeed ZeRO-2.

    deepspeed --num_gpus 8 epic/pretrain.py --ds_config ds_configs/zero2_bf16.json --config meter_4m [key=value ...]
    srun python epic/pretrain.py ...            (rank / world size from SLURM_*)
    python epic/pretrain.py --ds_config ds_configs/cpu_zero2.json --config shapes_tiny data.root=DIR run.dir=RUN

A run started on a `run.dir` that holds a checkpoint resumes from it (`--resume none` refuses, `--resume PATH`
picks one), on any number of ranks that divides `data.streams`. `--check-only` validates config, DeepSpeed JSON,
world size, shards and teacher, then exits.

Exit codes: 0 done (or preempted with a checkpoint), 1 the run stopped (non-finite losses, a failed save), 2 bad
config / inputs (one line on stderr), 3 a collective failed (a rank died or hung; relaunch to resume).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # running as a script: do not let epic/*.py shadow top-level modules

import argparse
import json


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="packaged config name (e.g. meter_4m) or a YAML path")
    parser.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", required=True,
                        help="DeepSpeed JSON (ds_configs/zero2_bf16.json on A100/H100, cpu_zero2.json on CPU)")
    parser.add_argument("--resume", default="auto", help="auto (default) | none | PATH to a run or checkpoint dir")
    parser.add_argument("--check-only", action="store_true", help="validate everything, train nothing")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-5 data.micro_batch_size=16")
    return parser.parse_args(argv)


def one_line(error: BaseException) -> str:
    from epic.config import one_line as config_one_line

    return config_one_line(error)


def user_errors() -> tuple:
    from epic.config import ConfigError
    from epic.dist import DistEnvError
    from epic.engine.checkpoint import CheckpointError
    from epic.engine.setup import SetupError

    return ConfigError, SetupError, CheckpointError, DistEnvError


def check_only(args) -> int:
    """--check-only: config, DeepSpeed JSON, batch arithmetic, data, teacher, resume point; no process group, no
    engines, nothing written. 0 and a JSON line when all is well, else 2 and one line on stderr."""
    from epic.config import load_config
    from epic.dist import dist_info_from_env

    try:
        cfg = load_config(args.config, args.overrides)
        info = dist_info_from_env(os.environ)
        from epic.wiring import PretrainTrainer, check_run_inputs

        trainer = PretrainTrainer(cfg, args.ds_config, info, resume=args.resume)
        check_run_inputs(trainer)
    except user_errors() as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    if info.rank == 0:
        print(json.dumps({"check": "ok", "world_size": info.world_size,
                          "grad_accum_steps": trainer.batch.grad_accum_steps,
                          "resume_from": str(trainer.resume_from) if trainer.resume_from else None}))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.check_only:
        return check_only(args)
    from epic.config import ConfigError, load_config
    from epic.engine.checkpoint import CheckpointError

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {one_line(err)}", file=sys.stderr)
        return 2
    from epic.dist import (collective_timeout_s, init_distributed, is_collective_failure, peer_report,
                           start_heartbeat)
    from epic.engine.preemption import PreemptionHandler
    from epic.wiring import PretrainTrainer

    # Installed before any heavy work: a SIGUSR1/SIGTERM during start-up is kept and honoured after the first step
    preemption = PreemptionHandler()
    try:
        timeout_s = collective_timeout_s(cfg.run.collective_timeout_s)
        info = init_distributed(timeout_minutes=timeout_s / 60)
        start_heartbeat()  # so that a failed collective can say which rank died or hangs
    except user_errors() as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    if cfg.train.deterministic:
        import torch

        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        trainer = PretrainTrainer(cfg, args.ds_config, info, resume=args.resume)
        trainer.setup()
    except user_errors() as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:
        if not is_collective_failure(err):
            raise
        _collective_failure(err, info, timeout_s, peer_report)
    try:
        result = trainer.train(preemption)
    except CheckpointError as err:  # e.g. the disk filled up during a save
        print(f"error (rank {info.rank}): {one_line(err)}", file=sys.stderr, flush=True)
        _exit_now(1)
    except Exception as err:
        if not is_collective_failure(err):
            raise
        _collective_failure(err, info, timeout_s, peer_report)
    if info.rank == 0:
        print(json.dumps({"final_step": result.step, "start_step": result.start_step, "checkpoint": result.checkpoint,
                          "preempted": result.preempted, "stopped_nonfinite": result.stopped_nonfinite,
                          "last_loss": result.losses[-1] if result.losses else None}), flush=True)
    if result.stopped_nonfinite:
        _exit_now(1)
    return 0


def _exit_now(code: int) -> None:
    """Leave a distributed run that stopped on an error without the interpreter's teardown of the process group
    and store threads (which can abort with "terminate called without an active exception", turning exit 1 into
    a SIGABRT for the launcher). Everything worth keeping is on disk already."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _collective_failure(err: BaseException, info, timeout_s: float, peer_report) -> None:
    """A rank died or hung: say which, and exit now (a broken process group cannot be shut down cleanly)."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    print(f"collective failure on rank {info.rank} of {info.world_size}: "
          f"{peer_report(info.rank, info.world_size)} (run.collective_timeout_s={timeout_s:g}; "
          f"{type(err).__name__}: {first[:300]}). Relaunch the job: it resumes from the newest checkpoint.",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(3)


if __name__ == "__main__":
    sys.exit(main())
