"""Launch helpers shared by the tests: free ports, torchrun'd CLI scripts on CPU ranks, logged metrics."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "epic" / "pretrain.py"


def free_port() -> int:
    """A port nobody listens on now (not a guessed one: other runs may share the machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(**extra) -> dict:
    """The test process's environment for a child run: one thread per rank, this checkout first on PYTHONPATH and
    the venv's bin first on PATH (DeepSpeed JIT-loads its shm op with the `ninja` on PATH; another ninja, e.g.
    /usr/bin's, invalidates the shared build cache and rebuilds the op, ~30 s per rank)."""
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT), PATH=path,
                **extra)


def run_cli(args, ranks: int = 1, timeout: float = 600, check: bool = True, env: dict | None = None):
    """Run an epic CLI script (args[0] is its path) in 1 process or on `ranks` torchrun ranks."""
    cmd = [sys.executable, *map(str, args)]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
               str(free_port()), *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env or cli_env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, \
            f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}"
    return proc


def run_pretrain(args, ranks: int = 2, timeout: float = 600):
    """epic/pretrain.py on `ranks` CPU ranks (gloo); fails the test with the run's output if it exits non-zero."""
    return run_cli([PRETRAIN, *args], ranks=ranks, timeout=timeout)


def logged(run_dir, key) -> dict:
    """{step: value} of one key in run_dir/metrics.jsonl."""
    rows = [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]
    return {row["step"]: row[key] for row in rows if key in row}


def run_and_resume(args, run_root, resume_step: int = 2, split: int = 4):
    """Run epic/pretrain.py uninterrupted into run_root/full, then again into run_root/resumed from the full run's
    checkpoint at `resume_step` (`--resume` goes after args[:split], the ds_config and --config pair).
    Returns (full, resumed, stdout of the uninterrupted run)."""
    full, resumed = Path(run_root) / "full", Path(run_root) / "resumed"
    proc = run_pretrain(args + [f"run.dir={full}"])
    checkpoint = full / "checkpoints" / f"step_{resume_step:08d}"
    again = run_pretrain(args[:split] + ["--resume", str(checkpoint)] + args[split:] + [f"run.dir={resumed}"])
    assert "resumed from" in again.stdout and f"at step {resume_step}" in again.stdout, again.stdout[-2000:]
    return full, resumed, proc.stdout


def assert_logged_equal_after(full, resumed, keys, resume_step: int = 2):
    """Every logged value of `keys` after the resume step is the uninterrupted run's (to float round-off)."""
    import pytest

    for key in keys:
        expected, again = logged(full, key), logged(resumed, key)
        assert again and sorted(again) == [step for step in sorted(expected) if step > resume_step], key
        for step in again:
            assert again[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), (key, step)


def assert_same_final_weights(full, resumed, step: int = 4):
    """The last checkpoints of the two runs are both at `step` and hold bit-identical weights in every engine."""
    import torch

    from epic.engine.checkpoint import find_checkpoint, read_module_state_dict

    a, b = find_checkpoint(full), find_checkpoint(resumed)
    assert a.name == b.name == f"step_{step:08d}"
    engines = sorted(p.name for p in a.iterdir() if p.is_dir())
    assert engines, f"no engine folders in {a}"
    for engine in engines:
        wa, wb = read_module_state_dict(a, engine), read_module_state_dict(b, engine)
        assert wa.keys() == wb.keys()
        for name in wa:
            torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=0, msg=f"{engine}: {name}")
