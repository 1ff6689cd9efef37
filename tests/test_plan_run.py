"""tools/plan_run.py: the sizing arithmetic is self-consistent and uses the trainer's FLOP count."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import plan_run  # noqa: E402


def test_zero2_state_bytes_follow_the_zero_paper():
    # 2 bytes of bf16 weights on every rank; bf16 gradients, fp32 master weights, Adam m and v split over N.
    assert plan_run.zero2_state_bytes(1000, 4) == {"weights": 2000, "gradients": 500, "master + adam": 3000}
    assert plan_run.zero2_state_bytes(1000, 1)["master + adam"] == 12000


def test_bucket_bytes_reads_the_deepspeed_json():
    ds = {"zero_optimization": {"reduce_bucket_size": 100, "allgather_bucket_size": 10, "overlap_comm": True}}
    assert plan_run.bucket_bytes(ds, 2) == (2 * 100 + 10) * 2
    ds["zero_optimization"]["overlap_comm"] = False
    assert plan_run.bucket_bytes(ds, 2) == (100 + 10) * 2


@pytest.fixture(scope="module")
def tiny_plan():
    return plan_run.main(["--config", "shapes_tiny", "--gpus", "2", "--gpu", "a100-80g", "--mfu", "0.5",
                          "--micro-batch", "8", "model.vocab_size=1000"])


def test_plan_is_self_consistent(tiny_plan):
    out = tiny_plan
    from epic.config import load_config

    cfg = load_config("shapes_tiny", ["model.vocab_size=1000"])
    assert out["batch"]["grad_accum_steps"] == 32 // (8 * 2)
    achieved = 2 * 312e12 * 0.5
    assert out["flops"]["per_step"] == pytest.approx(out["flops"]["per_sample"] * 32)
    assert out["time"]["step_s"] == pytest.approx(out["flops"]["per_step"] / achieved)
    assert out["time"]["run_hours"] * 3600 == pytest.approx(out["time"]["step_s"] * cfg.train.max_steps)
    assert out["data"]["samples_per_s"] * out["time"]["step_s"] == pytest.approx(32)
    assert out["memory_total_gib"] == pytest.approx(sum(out["memory_gib"].values()))
    # The largest micro batch fits in 95% of the GPU and one more sample does not.
    per_sample = out["memory_gib"]["activations"] / 8
    fixed = out["memory_total_gib"] - out["memory_gib"]["activations"]
    limit = 0.95 * out["gpu_memory_gib"]
    assert fixed + out["max_micro_batch"] * per_sample <= limit < fixed + (out["max_micro_batch"] + 1) * per_sample


def test_vlm_flops_are_what_the_trainer_logs(tiny_plan):
    """The plan's VLM figure is VanillaObjective.flops_per_sample, the trainer's perf/flops_per_sample."""
    from epic.config import load_config
    from epic.engine.build import VanillaObjective

    expected = VanillaObjective().flops_per_sample(load_config("shapes_tiny", ["model.vocab_size=1000"]))
    assert tiny_plan["flops"]["per_sample_by_pass"]["vlm (ITM + MLM)"] == pytest.approx(expected, rel=1e-9)
    assert expected > 0


TABLE = """GPU check: NVIDIA H200 | torch 2.11.0 | triton 3.6.0 | deepspeed 0.19.8 | 2026-12-02 10:00 UTC

| phase | status | seconds | note |
|---|---|---|---|
| epic_bf16 | ok | 95 |  |

Training runs (epic_meter_4m, random weights, 288 px, micro batch 32, 30 steps; figures of the last 10 steps)
| run | samples/s | TFLOP/s | MFU | peak mem GiB | GFLOP/sample | loss |
|---|---|---|---|---|---|---|
| EPIC-METER, VLM bf16 + generator fp16 | 512.0 | 391.9 | 0.396 | 61.2 | 765.4 | 11.2 |
| EPIC-METER, VLM fp16 + generator fp16 | - | - | - | - | - | - |
"""


def test_measured_mfu_comes_from_the_gpu_check_table(tmp_path):
    """--measured reads the MFU of the VLM's precision from tools/gpu_check.sh's table, instead of --mfu."""
    import torch

    table = tmp_path / "gpu_check.txt"
    table.write_text(TABLE)
    mfu, source = plan_run.read_measured_mfu(str(table), torch.bfloat16)
    assert mfu == 0.396 and "NVIDIA H200" in source
    with pytest.raises(SystemExit, match="no measured MFU for the VLM in fp16"):
        plan_run.read_measured_mfu(str(table), torch.float16)  # that run failed: no silent fallback
    args = ["--config", "shapes_tiny", "--gpus", "2", "--micro-batch", "8", "model.vocab_size=1000"]
    measured = plan_run.main(args + ["--measured", str(table)])
    achieved = 2 * 312e12 * 0.396  # a100-80g peak x the measured MFU
    assert measured["mfu"] == 0.396 and measured["time"]["step_s"] == pytest.approx(measured["flops"]["per_step"] / achieved)
    assert measured["mfu_source"].startswith("measured on NVIDIA H200")
    import json

    (tmp_path / "gpu_check.json").write_text(json.dumps({"meta": {"device": "H200"},
                                                         "runs": {"epic_bf16": {"mfu": 0.25}}}))
    assert plan_run.read_measured_mfu(str(tmp_path / "gpu_check.json"), torch.bfloat16)[0] == 0.25
