"""A non-finite loss skips the whole optimizer step under our DeepSpeed configs: nothing applied, lr not advanced.

This is what the trainer relies on (it back-propagates the non-finite loss and lets DeepSpeed's overflow check
drop the step on every rank), so it is checked against the real engine for each shipped CPU config."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from launch import free_port

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, os, sys
import torch, deepspeed
from epic.engine.setup import derive_batch_math, load_ds_config, resolve_ds_config, initialize_engine
from epic.engine.schedule import build_lr_scheduler
deepspeed.init_distributed(dist_backend="gloo")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
opt = torch.optim.AdamW(model.parameters(), lr=0.1)
sched = build_lr_scheduler(opt, "linear", total_steps=10, warmup_ratio=0.5)
ds = resolve_ds_config(load_ds_config(sys.argv[1]), derive_batch_math(2, 2, 1), grad_clip=1.0, on_cpu=True)
engine = initialize_engine(model, opt, sched, ds)
dtype = next(engine.module.parameters()).dtype
x = torch.randn(2, 4, dtype=dtype)
def step(poison):
    loss = engine.module(x).float().pow(2).mean()
    if poison:
        loss = loss * float("nan")
    engine.backward(loss)
    engine.step()
step(False)
before = [p.detach().clone() for p in engine.module.parameters()]
lr_before = sched.get_last_lr()[0]
step(True)
unchanged = all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
lr_after_skip = sched.get_last_lr()[0]
step(False)
changed_after = not all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
print(json.dumps({"unchanged": unchanged, "skipped": engine.skipped_steps, "lr_same": lr_before == lr_after_skip,
                  "trains_after": changed_after}))
"""


@pytest.mark.parametrize("ds_config", ["ds_configs/cpu_zero2.json", "ds_configs/cpu_zero2_bf16.json"])
def test_nonfinite_loss_skips_the_step(ds_config, tmp_path):
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, ds_config], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"unchanged": True, "skipped": 1, "lr_same": True, "trains_after": True}
