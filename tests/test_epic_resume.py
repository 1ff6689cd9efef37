"""A 2-rank EPIC run (gloo, ZeRO-2, 2 micro-batches per step) through epic/pretrain.py checkpoints and resumes
exactly: a second job resumed from the first job's mid-run checkpoint logs the same losses and ends with the same
weights of the VLM *and* the generator engine as the first job, which was never interrupted."""
import json
from pathlib import Path

import pytest
import torch
from launch import assert_same_final_weights, logged, run_pretrain as run_epic


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
            "data.num_workers=0", "train.log_every=1", "train.deterministic=true", "train.max_steps=4",
            "train.save_every=2", "train.keep_last=2", "epic.generator.lr=1e-3", "epic.log_saliency_every=2"]
    cfg = load_config("epic_shapes_tiny", args[4:])
    torch.manual_seed(7)
    teacher, _ = build_model(cfg, resolve_data_paths(cfg))  # an (untrained) vanilla METER export as the teacher
    teacher.save_pretrained(str(tmp / "teacher"))
    return tmp, args


def test_two_rank_epic_run_resumes_exactly(teacher_and_args):
    tmp, args = teacher_and_args
    full, resumed_run = tmp / "full", tmp / "resumed"
    proc = run_epic(args + [f"run.dir={full}"])  # saves at steps 2 and 4
    assert "grad accum 2" in proc.stdout and "world 2" in proc.stdout
    assert (full / "checkpoints" / "step_00000002" / "generator").is_dir()
    proc = run_epic(["--resume", str(full / "checkpoints" / "step_00000002")] + args + [f"run.dir={resumed_run}"])
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout

    for key in ("train/loss", "train/loss_gen", "train/loss_itc", "epic/inconsistent_token_ratio"):
        expected, resumed = logged(full, key), logged(resumed_run, key)
        assert sorted(expected) == [1, 2, 3, 4] and sorted(resumed) == [3, 4], key
        for step in resumed:
            assert resumed[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), (key, step, differences(
                full, resumed_run, step))
    assert_same_final_weights(full, resumed_run)
    generator_steps = logged(resumed_run, "epic/gen_lr")
    assert generator_steps[4] == pytest.approx(logged(full, "epic/gen_lr")[4])
    images = saliency_images(full)
    assert images == [2, 4], images  # the Fig. 4-style figure, every epic.log_saliency_every steps


def saliency_images(run_dir):
    """Steps at which rank 0 logged the 'epic/saliency' image to TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(run_dir) / "tb"), size_guidance={"images": 0})
    events.Reload()
    return [e.step for e in events.Images("epic/saliency")] if "epic/saliency" in events.Tags()["images"] else []
