"""`tools/study.py STUDY --slurm`: the study's units as Slurm job arrays, then the report.

Two arrays: phase 0 (vanilla teachers, modality-bias trainings) and phase 1 (everything that needs them), the
second with `--dependency=afterok:<first>`. Array task i runs `tools/study.py STUDY ... --unit PHASE:i`, which runs
that one unit; inside it every trainer goes through slurm/launch.sh (srun over the task's allocation; checkpoint
and requeue on SIGUSR1; a requeued task resumes its stages). When both arrays have left the queue, the study
collects the cached results and writes its report as without --slurm.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from .common import REPO

RESOURCES = {  # per array task
    "tiny": ["--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=2", "--time=04:00:00"],
    "smoke": ["--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=00:30:00"],
    "ablation": ["--nodes=1", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=8", "--mem=0",
                 "--time=48:00:00"],
}


def array_script(study_name: str, phase: int, count: int, argv: Sequence[str], out: Path, scale: str,
                 extra: Sequence[str] = ()) -> str:
    """The sbatch script of one phase's array: its header and the command of task $SLURM_ARRAY_TASK_ID."""
    header = [f"--job-name=study-{study_name}-p{phase}", f"--array=0-{count - 1}",
              f"--output={out / 'slurm' / 'logs'}/%x-%A_%a.out", "--open-mode=append", "--requeue",
              "--signal=B:USR1@600", *RESOURCES[scale], *extra]
    command = [sys.executable, "tools/study.py", *argv, "--unit", f"{phase}:$SLURM_ARRAY_TASK_ID"]
    quoted = " ".join(shlex.quote(c) if "$SLURM_ARRAY_TASK_ID" not in c else f'"{c}"' for c in command)
    return "\n".join(["#!/bin/bash", *(f"#SBATCH {h}" for h in header),
                      f"cd {shlex.quote(str(REPO))}", f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}",
                      f"exec {quoted}", ""])


def submit_arrays(study_name: str, phases: dict[int, int], argv: Sequence[str], out: Path, scale: str,
                  extra: Sequence[str] = (), sbatch: str = "sbatch") -> list[str]:
    """Write OUT/slurm/phase{P}.sbatch and submit them (phase 1 after phase 0); returns the job ids."""
    folder = out / "slurm"
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    jobs: list[str] = []
    for phase in sorted(phases):
        if phases[phase] == 0:
            continue
        script = folder / f"phase{phase}.sbatch"
        script.write_text(array_script(study_name, phase, phases[phase], argv, out, scale, extra))
        cmd = [sbatch, "--parsable"] + ([f"--dependency=afterok:{jobs[-1]}"] if jobs else []) + [str(script)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed: {proc.stderr.strip()}")
        jobs.append(proc.stdout.strip().split(";")[0])
    return jobs


def wait_for(jobs: Sequence[str], poll: float = 20.0, log=print) -> None:
    """Until none of the jobs (arrays) is in the queue any more."""
    while jobs:
        proc = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(jobs)], capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        if proc.returncode != 0 or not lines:
            return
        log(f"[slurm] {len(lines)} array task(s) queued or running")
        time.sleep(poll)
