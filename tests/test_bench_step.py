"""tools/bench_step.py --family: a non-METER family's vanilla step against its EPIC step, and clear errors."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import bench_step  # noqa: E402


def test_albef_family_counts_the_trainers_steps():
    from epic.objectives.vanilla import VanillaObjective

    results = bench_step.main(["--family", "albef", "--config", "albef_shapes_tiny", "--epic-config",
                               "epic_albef_shapes_tiny", "--vocab-size", "64", "--no-timing"])
    kinds = results["kinds"]
    vanilla_cfg, _ = bench_step.family_run_configs("albef", "albef_shapes_tiny", "epic_albef_shapes_tiny", None, 64)
    # the figure is the one the trainer logs for MFU (the ALBEF recipe, momentum forward included)
    trainer_count = VanillaObjective().flops_per_sample(vanilla_cfg)
    assert kinds["vanilla"]["gflops_per_sample"] * 1e9 == pytest.approx(trainer_count)
    epic, cached = kinds["epic"], kinds["epic_saliency_cache"]
    parts = ("teacher", "generator", "vlm")
    assert epic["gflops_per_sample"] == pytest.approx(sum(epic[f"{p}_gflops_per_sample"] for p in parts))
    assert cached["teacher_gflops_per_sample"] == 0 < epic["teacher_gflops_per_sample"]
    assert epic["vlm_gflops_per_sample"] > kinds["vanilla"]["gflops_per_sample"]  # + the ITC pass on w_bar
    assert results["flop_ratio_epic_over_vanilla"] == pytest.approx(
        epic["gflops_per_sample"] / kinds["vanilla"]["gflops_per_sample"])


@pytest.mark.parametrize("argv, message", [
    (["--family", "albeff"], "not a registered family; choose one of ['albef', 'meter', 'vilt', 'xvlm']"),
    (["--family", "albef", "--config", "vilt_shapes_tiny"], "is family 'vilt', not --family 'albef'"),
    (["--family", "albef", "--config", "albef_shapes_tiny", "--epic-config", "albef_shapes_tiny", "--vocab-size", "64"],
     "has epic.enabled false"),
    (["--family", "albef", "--config", "albef_shapes_tiny"], "takes model.vocab_size from the tokenizer"),
    (["--epic-config", "epic_meter_4m"], "--epic-config is for --family other than meter"),
])
def test_bad_family_arguments_fail_early(argv, message):
    with pytest.raises(SystemExit, match=message.replace("[", r"\[").replace("]", r"\]")):
        bench_step.main(argv + ["--no-timing"])
