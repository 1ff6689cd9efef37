"""A 2-rank EPIC run (gloo, ZeRO-2, 2 micro-batches per step) through epic/pretrain.py checkpoints and resumes
exactly: the same losses at every step and the same final weights of the VLM *and* the generator engine as a run
that was never interrupted."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

PRETRAIN = ROOT / "epic" / "pretrain.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_epic(args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(PRETRAIN), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}"
    return proc


def logged(run_dir, key):
    rows = [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]
    return {row["step"]: row[key] for row in rows if key in row}


def differences(run_a, run_b, step):
    """Every logged value that differs between two runs at ``step`` (for the failure message)."""
    rows = [{r["step"]: r for r in map(json.loads, open(Path(run) / "metrics.jsonl"))}[step] for run in (run_a, run_b)]
    return {k: (v, rows[1].get(k)) for k, v in rows[0].items() if not k.startswith(("perf/", "time/"))
            and v != rows[1].get(k)}


@pytest.fixture(scope="module")
def teacher_and_args(shapes_world, tmp_path_factory):
    from epic.config import load_config
    from epic.engine.build import build_model, resolve_data_paths

    tmp = tmp_path_factory.mktemp("epic_resume")
    args = ["--ds_config", "ds_configs/cpu_zero2.json", "--config", "epic_shapes_tiny", f"data.root={shapes_world}",
            f"epic.teacher={tmp / 'teacher'}", "data.micro_batch_size=4", "train.global_batch_size=16",
            "data.num_workers=1", "train.log_every=1", "train.deterministic=true", "train.max_steps=4",
            "train.save_every=100", "epic.generator.lr=1e-3", "epic.log_saliency_every=2"]
    cfg = load_config("epic_shapes_tiny", args[4:])
    torch.manual_seed(7)
    teacher, _ = build_model(cfg, resolve_data_paths(cfg))  # an (untrained) vanilla METER export as the teacher
    teacher.save_pretrained(str(tmp / "teacher"))
    return tmp, args


def test_two_rank_epic_run_resumes_exactly(teacher_and_args):
    from epic.engine.checkpoint import find_checkpoint, read_module_state_dict

    tmp, args = teacher_and_args
    full, split = tmp / "full", tmp / "split"
    proc = run_epic(args + [f"run.dir={full}"])
    assert "grad accum 2" in proc.stdout and "world 2" in proc.stdout
    run_epic(args + [f"run.dir={split}", "train.stop_at_step=2"])
    assert sorted(logged(split, "train/loss")) == [1, 2]
    proc = run_epic(args + [f"run.dir={split}"])
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout

    for key in ("train/loss", "train/loss_gen", "train/loss_itc", "epic/inconsistent_token_ratio"):
        expected, resumed = logged(full, key), logged(split, key)
        assert sorted(expected) == sorted(resumed) == [1, 2, 3, 4], key
        for step in expected:
            assert resumed[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), (key, step, differences(
                full, split, step))
    full_ckpt, split_ckpt = find_checkpoint(full), find_checkpoint(split)
    assert full_ckpt.name == split_ckpt.name == "step_00000004"
    for engine in ("vlm", "generator"):
        a, b = read_module_state_dict(full_ckpt, engine), read_module_state_dict(split_ckpt, engine)
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=f"{engine}: {name}")
    generator_steps = logged(split, "epic/gen_lr")
    assert generator_steps[4] == pytest.approx(logged(full, "epic/gen_lr")[4])
    images = saliency_images(full)
    assert images == [2, 4], images  # the Fig. 4-style figure, every epic.log_saliency_every steps


def saliency_images(run_dir):
    """Steps at which rank 0 logged the 'epic/saliency' image to TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(run_dir) / "tb"), size_guidance={"images": 0})
    events.Reload()
    return [e.step for e in events.Images("epic/saliency")] if "epic/saliency" in events.Tags()["images"] else []
