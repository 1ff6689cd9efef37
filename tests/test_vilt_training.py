"""ViLT through the family framework: a 2-rank ZeRO-2 pretraining run (with ViLT's patch sampling, whole-word
masking and WPA) resumes exactly; EPIC-ViLT runs and resumes exactly; every EPIC ablation switch runs a step on
ViLT (one CPU DeepSpeed rank in this process)."""
from __future__ import annotations

import json

import pytest
import torch
from inprocess import build_engine, export_teacher_and_eval_batch
from launch import assert_logged_equal_after, assert_same_final_weights, run_and_resume

BATCH = 4


def assert_resumed_exactly(full, resumed, keys):
    """Steps 3 and 4 of the resumed run are the uninterrupted run's: its logs and its final weights."""
    assert_logged_equal_after(full, resumed, keys)
    assert_same_final_weights(full, resumed)


OVERRIDES = [f"data.micro_batch_size={BATCH}", "train.global_batch_size=16", "data.num_workers=0", "train.log_every=1",
             "train.deterministic=true", "train.max_steps=4", "train.save_every=2", "train.keep_last=2"]


def cli(config, *overrides):
    return ["--ds_config", "ds_configs/cpu_zero2.json", "--config", config, *OVERRIDES, *overrides]


def test_two_rank_zero2_vilt_run_resumes_exactly(shapes_world, tmp_path):
    """vilt_shapes_tiny keeps 48 of 64 patches per image in training: the draws come from the checkpointed
    objective generator, so the resumed run sees the same patches."""
    from epic.config import load_config

    cfg = load_config("vilt_shapes_tiny", [f"data.root={shapes_world}"])
    assert cfg.model.max_image_len < (cfg.model.image_size // cfg.model.patch_size) ** 2
    assert cfg.data.whole_word_masking
    full, resumed, stdout = run_and_resume(cli("vilt_shapes_tiny", f"data.root={shapes_world}"), tmp_path)
    assert "world 2" in stdout and "grad accum 2" in stdout
    assert_resumed_exactly(full, resumed, ("train/loss", "train/loss_itm", "train/loss_mlm"))
    state = json.loads((full / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["config"]["model"]["family"] == "vilt"


def test_two_rank_epic_vilt_run_resumes_exactly(shapes_world, tmp_path):
    from epic.config import load_config
    from epic.wiring import build_model, resolve_data_paths

    teacher = tmp_path / "teacher"
    base = load_config("vilt_shapes_tiny", [f"data.root={shapes_world}"])
    torch.manual_seed(7)
    model, _ = build_model(base, resolve_data_paths(base))  # an (untrained) vanilla ViLT export as the teacher
    model.save_pretrained(str(teacher))
    args = cli("epic_vilt_shapes_tiny", f"data.root={shapes_world}", f"epic.teacher={teacher}")
    full, resumed, _ = run_and_resume(args, tmp_path)
    assert (full / "checkpoints" / "step_00000002" / "generator").is_dir()
    assert_resumed_exactly(full, resumed, ("train/loss", "train/loss_gen", "train/loss_itc",
                                           "epic/inconsistent_token_ratio"))


# ------------------------------------------------------------------------------------ ablations, in process
def epic_vilt_config(world, teacher, *overrides):
    from epic.config import load_config

    return load_config("epic_vilt_shapes_tiny", [f"data.root={world}", f"epic.teacher={teacher}",
                                                 f"data.micro_batch_size={BATCH}", f"train.global_batch_size={BATCH}",
                                                 "train.max_steps=10", *overrides])


@pytest.fixture(scope="module")
def setup(shapes_world, tmp_path_factory, gloo_rank):
    tmp = tmp_path_factory.mktemp("vilt_epic")
    paths, _, batch = export_teacher_and_eval_batch(epic_vilt_config(shapes_world, tmp / "teacher"),
                                                    tmp / "teacher", BATCH)
    return {"world": shapes_world, "tmp": tmp, "paths": paths, "batch": batch}


def build(setup, *overrides):
    cfg = epic_vilt_config(setup["world"], setup["tmp"] / "teacher", *overrides)
    engine, objective = build_engine(cfg, setup["paths"], BATCH)
    return cfg, engine, objective


ABLATIONS = {
    "epic": [],
    "itc_rand": ["epic.corruption=random", "epic.masking=uniform"],
    "itc_lm": ["epic.masking=uniform"],
    "lm_fixed": ["epic.generator_mode=fixed"],
    "lm_cond": ["epic.generator_mode=conditioned"],
    "vlm_sas": ["epic.generator_mode=vlm_sas", "epic.sas_refresh_every=1"],
    "cmlm": ["data.mlm_masking=saliency", "data.whole_word_masking=false"],
    "ratio_lambda": ["epic.mask_ratio=0.15", "epic.lambda_itc=1.0"],
    "itc_pair_sum": ["epic.itc_reduction=pair_sum", "epic.lambda_itc=0.25"],
}


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_every_ablation_switch_runs_a_step_on_vilt(setup, name):
    cfg, engine, objective = build(setup, *ABLATIONS[name])
    before = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    torch.manual_seed(1000)
    out = objective.losses(engine.module, setup["batch"], torch.Generator().manual_seed(0), 0)
    engine.backward(out["loss"])
    engine.step()
    assert all(torch.isfinite(v).all() for v in out.values()), out
    assert "loss_wpa" in out  # ViLT's recipe under EPIC: MLM + ITM + WPA, then lambda * ITC
    expected = out["loss_itm"] + out["loss_mlm"] + out["loss_wpa"] + cfg.epic.lambda_itc * out["loss_itc"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert ("loss_gen" in out) == (cfg.epic.corruption == "generator")
    after = engine.module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
