"""X-VLM through the real trainer (epic/pretrain.py -> epic.wiring -> epic.engine.trainer): half of the optimizer
steps train on region batches (data.regions, the shapes world's boxes), drawn by the objective instead of the caption
loader; a 2-rank ZeRO-2 run resumed at step 2 equals the uninterrupted run across caption and region steps, and so
does EPIC-X-VLM (EPIC on caption steps, X-VLM's region losses on region steps)."""
from __future__ import annotations

import json

import pytest
import torch
from launch import assert_logged_equal_after, assert_same_final_weights, logged, run_and_resume

BATCH = 4
OVERRIDES = [f"data.micro_batch_size={BATCH}", "train.global_batch_size=16", "data.num_workers=0", "train.log_every=1",
             "train.deterministic=true", "train.max_steps=4", "train.save_every=2", "train.keep_last=2",
             f"data.regions.micro_batch_size={BATCH}", "data.regions.max_images=2", "data.max_text_len=16"]


def cli(config, *overrides):
    return ["--ds_config", "ds_configs/cpu_zero2.json", "--config", config, *OVERRIDES, *overrides]


def run_and_resume_checked(args, tmp_path, accum=2):
    full, resumed, stdout = run_and_resume(args, tmp_path)
    assert "world 2" in stdout and f"grad accum {accum}" in stdout
    return full, resumed


def assert_resumed_exactly(full, resumed, keys):
    assert_logged_equal_after(full, resumed, keys)
    assert_same_final_weights(full, resumed)


def region_positions(run_dir, step):
    """Each rank's region-loader position saved at ``step`` (the objective's part of the per-rank state)."""
    ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
    states = [torch.load(ckpt / f"rank_{r:05d}.pt", weights_only=False) for r in range(2)]
    return [s["objective"]["region_loader"] for s in states], [s["data"]["batches"] for s in states]


def test_two_rank_zero2_xvlm_run_with_region_steps_resumes_exactly(shapes_world, tmp_path):
    full, resumed = run_and_resume_checked(cli("xvlm_shapes_tiny", f"data.root={shapes_world}"), tmp_path)
    # steps 1..4 = caption, region, caption, region (iter_perc 0.5); the box losses exist on region steps only
    assert logged(full, "train/region_step") == {1: 0.0, 2: 1.0, 3: 0.0, 4: 1.0}
    assert sorted(logged(full, "train/bbox_giou")) == [2, 4] and sorted(logged(full, "train/contrastive")) == [1, 2, 3, 4]
    assert_resumed_exactly(full, resumed, ("train/loss", "train/contrastive", "train/itm", "train/mlm",
                                           "train/bbox_l1", "train/bbox_giou"))
    regions, caption_batches = region_positions(full, 2)
    # 2 micro-batches per step: one region step drew 2 region batches per rank and left the caption loader alone
    assert [r["batches"] for r in regions] == [2, 2] and caption_batches == [2, 2]
    assert regions[0]["rank"] == 0 and regions[1]["rank"] == 1 and regions[0]["positions"] != regions[1]["positions"]
    state = json.loads((full / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["config"]["data"]["regions"]["iter_perc"] == 0.5 and state["config"]["data"]["mlm_masking"] == "xvlm"


def test_two_rank_epic_xvlm_run_with_region_steps_resumes_exactly(shapes_world, tmp_path):
    from epic.config import load_config
    from epic.wiring import build_model, resolve_data_paths

    teacher = tmp_path / "teacher"
    base = load_config("xvlm_shapes_tiny", [f"data.root={shapes_world}"])
    torch.manual_seed(7)
    model, _ = build_model(base, resolve_data_paths(base))  # an (untrained) vanilla X-VLM export as the teacher
    model.save_pretrained(str(teacher))
    args = cli("epic_xvlm_shapes_tiny", f"data.root={shapes_world}", f"epic.teacher={teacher}",
               "epic.log_saliency_every=0", "train.global_batch_size=8")  # one micro-batch per step: half the work
    full, resumed = run_and_resume_checked(args, tmp_path, accum=1)
    assert (full / "checkpoints" / "step_00000002" / "generator").is_dir()
    assert logged(full, "train/region_step") == {1: 0.0, 2: 1.0, 3: 0.0, 4: 1.0}
    # EPIC (ITC + generator) on caption steps only; region steps train X-VLM's region losses
    assert sorted(logged(full, "train/loss_itc")) == [1, 3] and sorted(logged(full, "train/loss_gen")) == [1, 3]
    assert sorted(logged(full, "train/bbox_giou")) == [2, 4]
    assert_resumed_exactly(full, resumed, ("train/loss", "train/loss_gen", "train/loss_itc", "train/bbox_giou",
                                           "epic/inconsistent_token_ratio"))


def test_an_x_vlm_export_loads_with_its_tied_decoder(shapes_world, tmp_path):
    """save_pretrained stores the MLM decoder tied to the word embeddings once; the one loader (teachers, fine-tuning,
    evaluation) accepts it as tied, not as missing, and still refuses a really missing tensor."""
    from safetensors.torch import load_file, save_file

    from epic.config import load_config
    from epic.models.loading import load_model
    from epic.wiring import build_model, resolve_data_paths

    cfg = load_config("xvlm_shapes_tiny", [f"data.root={shapes_world}"])
    torch.manual_seed(3)
    model, _ = build_model(cfg, resolve_data_paths(cfg))
    model.save_pretrained(str(tmp_path / "export"))
    stored = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert "text_encoder.cls.predictions.decoder.weight" not in stored  # stored once, under the embeddings' name
    loaded = load_model(str(tmp_path / "export")).model
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    stored.pop("itm_head.0.weight")
    save_file(stored, str(tmp_path / "export" / "model.safetensors"))
    with pytest.raises(ValueError, match="itm_head.0.weight"):
        load_model(str(tmp_path / "export"))


def test_region_steps_refuse_what_cannot_run(shapes_world):
    from types import SimpleNamespace

    from epic.config import ConfigError, load_config
    from epic.wiring import resolve_data_paths, resolve_region_sources, with_region_steps

    cfg = load_config("xvlm_shapes_tiny", [f"data.root={shapes_world}"])
    paths = resolve_data_paths(cfg)
    assert [name for name, _, _ in paths.region_sources] == ["shapes_regions"] and len(paths.region_sources[0][1]) == 4
    assert resolve_region_sources(load_config("xvlm_shapes_tiny", ["data.regions.iter_perc=0"])) == []
    with pytest.raises(ConfigError, match="no region shards"):
        resolve_region_sources(load_config("xvlm_shapes_tiny"))  # neither data.root nor data.regions.sources
    meter = SimpleNamespace(config=SimpleNamespace(family="meter"))
    with pytest.raises(ConfigError, match="model.family=meter"):
        with_region_steps(cfg, object(), meter, None, paths, 0, 1)


def test_throughput_counts_the_rows_of_the_batch_actually_trained():
    """perf/samples_per_s: a region step trains data.regions.micro_batch_size rows, not data.micro_batch_size."""
    from epic.engine.trainer import batch_rows

    assert batch_rows({"input_ids": torch.zeros(6, 16, dtype=torch.long), "target_bbox": torch.zeros(6, 4)}, 16) == 6
    assert batch_rows({"input_ids": torch.zeros(16, 16, dtype=torch.long)}, 16) == 16
    assert batch_rows({"pixel_values": torch.zeros(2, 3, 8, 8)}, 16) == 16  # no text rows: the configured size
