"""Pretrain METER (vanilla ITM + MLM, or EPIC) under DeepSpeed ZeRO-2.

    deepspeed --num_gpus 8 epic/pretrain.py --ds_config ds_configs/zero2_bf16.json --config meter_4m [key=value ...]
    srun python epic/pretrain.py ...            (rank / world size from SLURM_*)
    python epic/pretrain.py --ds_config ds_configs/cpu_zero2.json --config shapes_tiny data.root=DIR run.dir=RUN

A run started on a `run.dir` that holds a checkpoint resumes from it (`--resume none` refuses, `--resume PATH`
picks one). `--check-only` validates config, DeepSpeed JSON, world size, shards and teacher, then exits.
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


def main(argv=None) -> int:
    args = parse_args(argv)
    from epic.config import ConfigError, load_config, one_line

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {one_line(err)}", file=sys.stderr)
        return 2
    from epic.engine.checkpoint import CheckpointError
    from epic.engine.setup import SetupError
    from epic.dist import init_distributed
    from epic.engine.preemption import PreemptionHandler
    from epic.wiring import PretrainTrainer

    # Installed before any heavy work: a SIGUSR1/SIGTERM during start-up is kept and honoured after the first step
    preemption = None if args.check_only else PreemptionHandler()
    info = init_distributed()
    if cfg.train.deterministic:
        import torch

        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        trainer = PretrainTrainer(cfg, args.ds_config, info, resume=args.resume)
        if args.check_only:
            from epic.wiring import check_run_inputs

            check_run_inputs(trainer)
            if info.rank == 0:
                print(json.dumps({"check": "ok", "world_size": info.world_size,
                                  "grad_accum_steps": trainer.batch.grad_accum_steps,
                                  "resume_from": str(trainer.resume_from) if trainer.resume_from else None}))
            return 0
        trainer.setup()
    except (ConfigError, SetupError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = trainer.train(preemption)
    if info.rank == 0:
        print(json.dumps({"final_step": result.step, "checkpoint": result.checkpoint,
                          "preempted": result.preempted,
                          "last_loss": result.losses[-1] if result.losses else None}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
