"""A stand-in for epic/pretrain.py with the same launch contract and no model, so that the Slurm machinery
(slurm/launch.sh, epic/dist.py, PreemptionHandler, requeue) is tested in seconds:

- same arguments: --ds_config, --config, --check-only, key=value overrides (run.dir, train.max_steps,
  train.save_every are used);
- ranks from `epic.dist.init_distributed` (so under `srun` from SLURM_*), one all-reduce per step;
- auto-resume from run.dir; on SIGUSR1/SIGTERM every rank finishes its step, saves, prints
  `preempted: checkpoint saved at step N` and exits 0.

Per step it sleeps FAKE_STEP_SECONDS (default 0.2). Rank 0 appends one JSON line per event to run.dir/events.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--ds_config", required=True)
    parser.add_argument("--check-only", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from epic.config import load_config

    cfg = load_config(args.config, args.overrides)  # the real validation of config + overrides
    if not os.path.isfile(args.ds_config):
        print(f"error: DeepSpeed config {args.ds_config} not found", file=sys.stderr)
        return 2

    import torch
    import torch.distributed as dist

    from epic.dist import init_distributed
    from epic.engine.preemption import PreemptionHandler

    info = init_distributed()
    run_dir = Path(cfg.run.dir)
    state_file = run_dir / "fake_checkpoint.json"
    step = json.loads(state_file.read_text())["step"] if state_file.is_file() else 0

    def event(**fields) -> None:
        if info.rank == 0:
            fields.update(world_size=info.world_size, job=os.environ.get("SLURM_JOB_ID"),
                          restart=int(os.environ.get("SLURM_RESTART_COUNT", 0)), launcher=info.launcher)
            with open(run_dir / "events.jsonl", "a") as f:
                f.write(json.dumps(fields) + "\n")

    if args.check_only:
        event(event="check", step=step)
        print(json.dumps({"check": "ok", "world_size": info.world_size}), flush=True)
        return 0

    def save(at_step: int) -> None:
        dist.barrier()
        (run_dir / f"rank_{info.rank}_step.txt").write_text(str(at_step))
        dist.barrier()
        if info.rank == 0:
            tmp = state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"step": at_step}))
            os.replace(tmp, state_file)
        dist.barrier()

    preemption = PreemptionHandler()
    event(event="start", step=step)
    seconds = float(os.environ.get("FAKE_STEP_SECONDS", "0.2"))
    try:
        while step < cfg.train.max_steps:
            time.sleep(seconds)
            ones = torch.ones(1)
            dist.all_reduce(ones)
            assert int(ones.item()) == info.world_size
            step += 1
            print(f"rank {info.rank}/{info.world_size} step {step}", flush=True)
            if step % cfg.train.save_every == 0:
                save(step)
            if preemption.should_stop():
                save(step)
                event(event="preempted", step=step, signal=preemption.received.name if preemption.received else None)
                if info.rank == 0:
                    print(f"preempted: checkpoint saved at step {step}", flush=True)
                return 0
        save(step)
        event(event="done", step=step)
        if info.rank == 0:
            print(f"done at step {step}", flush=True)
        return 0
    finally:
        preemption.close()


if __name__ == "__main__":
    sys.exit(main())
