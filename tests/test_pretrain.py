"""End-to-end pretraining on the shapes world: 2 CPU ranks under DeepSpeed ZeRO-2, loss goes down, exact resume,
and the errors a user gets before any rank starts heavy work."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from launch import free_port

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = str(ROOT / "epic" / "pretrain.py")


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    return env


def run_pretrain(args, ranks=2, launcher="deepspeed", timeout=600):
    if ranks == 1:
        cmd = [sys.executable, PRETRAIN]
    elif launcher == "deepspeed":
        cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(ranks),
               "--master_port", str(free_port()), PRETRAIN]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--master_port", str(free_port()), PRETRAIN]
    proc = subprocess.run(cmd + args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    return proc


def read_losses(run_dir):
    rows = [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


def tiny_args(shapes_world, run_dir, *extra):
    return ["--ds_config", "ds_configs/cpu_zero2.json", "--config", "shapes_tiny", f"data.root={shapes_world}",
            f"run.dir={run_dir}", "data.micro_batch_size=8", "train.global_batch_size=16", "data.num_workers=1",
            "train.log_every=1", "train.deterministic=true", "train.lr=5e-4", *extra]


def _check(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def full_run(shapes_world, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full") / "run"
    proc = run_pretrain(tiny_args(shapes_world, run_dir, "train.max_steps=24", "train.save_every=100",
                                  "train.eval_every=24"))
    _check(proc)
    return run_dir, proc


def test_two_rank_zero2_training_reduces_loss(full_run):
    run_dir, proc = full_run
    losses = read_losses(run_dir)
    assert sorted(losses) == list(range(1, 25))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (22, 23, 24)) / 3
    assert last < first - 0.2, f"loss did not go down: {first:.3f} -> {last:.3f}"
    assert "world 2" in proc.stdout and "grad accum 1" in proc.stdout
    ckpt = run_dir / "checkpoints" / "step_00000024"
    assert (ckpt / "COMPLETE").is_file() and (ckpt / "vlm").is_dir()
    assert (ckpt / "rank_00000.pt").is_file() and (ckpt / "rank_00001.pt").is_file()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 24 and state["world_size"] == 2 and state["config"]["model"]["vocab_size"] > 0
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    evals = [row for row in rows if "eval/tr_r1" in row]
    assert len(evals) == 1 and evals[0]["step"] == 24 and 0.0 <= evals[0]["eval/ir_r10"] <= 100.0
    assert rows[-2]["perf/flops_per_sample"] > 0 and rows[-2]["data/skipped_bad_image"] == 0.0


def test_exact_resume_matches_uninterrupted_run(full_run, tmp_path):
    run_dir_full, _ = full_run
    expected = read_losses(run_dir_full)
    run_dir = tmp_path / "resumed"
    args = tiny_args(shapes_world_path(run_dir_full), run_dir, "train.max_steps=24", "train.save_every=100")
    # First job stops (with a checkpoint) at step 10; the torch launcher works as well as DeepSpeed's.
    proc = run_pretrain(args + ["train.stop_at_step=10"], launcher="torchrun")
    _check(proc)
    assert sorted(read_losses(run_dir)) == list(range(1, 11))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000010"
    proc = run_pretrain(args)  # same run.dir: resumes automatically
    _check(proc)
    assert "resumed from" in proc.stdout and "at step 10" in proc.stdout
    resumed = read_losses(run_dir)
    assert sorted(resumed) == list(range(1, 25))
    for step in range(1, 25):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), (step, resumed, expected)


def shapes_world_path(run_dir):
    import yaml

    return yaml.safe_load(open(Path(run_dir) / "config.yaml"))["data"]["root"]


def test_impossible_batch_fails_before_training(shapes_world, tmp_path):
    proc = run_pretrain(tiny_args(shapes_world, tmp_path / "r", "train.global_batch_size=20"), ranks=1)
    assert proc.returncode == 2
    assert "not a multiple of data.micro_batch_size (8)" in proc.stderr


def test_bad_config_key_fails_with_suggestion(shapes_world, tmp_path):
    proc = run_pretrain(tiny_args(shapes_world, tmp_path / "r", "train.max_stpes=3"), ranks=1)
    assert proc.returncode == 2 and "Did you mean 'train.max_steps'" in proc.stderr


def test_missing_data_root_is_explained(tmp_path):
    proc = run_pretrain(tiny_args(tmp_path / "nowhere", tmp_path / "r"), ranks=1)
    assert proc.returncode == 2 and "make_synthetic_shards.py" in proc.stderr


def test_check_only_and_resume_none(full_run):
    run_dir, _ = full_run
    args = tiny_args(shapes_world_path(run_dir), run_dir, "train.max_steps=24")
    proc = run_pretrain(["--check-only"] + args, ranks=1)
    _check(proc)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["check"] == "ok" and report["resume_from"].endswith("step_00000024")
    proc = run_pretrain(["--resume", "none"] + args, ranks=1)
    assert proc.returncode == 2 and "--resume none" in proc.stderr
