"""EPIC-ALBEF through the real trainer (epic/pretrain.py) on the shapes world: the ALBEF family is wired end to end
(config, registry, recipe, saliency teacher from an exported ALBEF, a BERT generator sized from ALBEF's text
encoder), and the trainer's after-step hook drives the momentum encoders, the alpha ramp and the queue, whose state
is in the checkpoint. (Exact 2-rank resume of that state: tests/test_albef_deepspeed.py.)"""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from test_pretrain import _check, run_pretrain

STEPS, BATCH, QUEUE = 3, 4, 10


def test_epic_albef_trains_with_an_albef_teacher_and_keeps_its_state(shapes_world, tmp_path):
    from epic.ckpt_files import find_checkpoint, read_module_state_dict
    from epic.config import load_config
    from epic.data.text import load_tokenizer
    from epic.models.albef import ALBEF

    tokenizer = load_tokenizer(Path(shapes_world) / "tokenizer")
    cfg = dataclasses.replace(load_config("albef_shapes_tiny").model, vocab_size=len(tokenizer),
                              pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    ALBEF(cfg).save_pretrained(str(tmp_path / "teacher"))

    run = tmp_path / "epic"
    proc = run_pretrain(["--ds_config", "ds_configs/cpu_zero2.json", "--config", "epic_albef_shapes_tiny",
                         f"data.root={shapes_world}", f"run.dir={run}", f"epic.teacher={tmp_path / 'teacher'}",
                         f"data.micro_batch_size={BATCH}", f"train.global_batch_size={BATCH}", "data.num_workers=0",
                         "train.log_every=1", f"train.max_steps={STEPS}", f"model.queue_size={QUEUE}",
                         "model.alpha_ramp_steps=2"], ranks=1)
    _check(proc)
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    logged = {row["step"]: row for row in rows if "train/loss" in row}
    assert sorted(logged) == list(range(1, STEPS + 1))
    for row in logged.values():
        for key in ("train/loss_ita", "train/loss_itm", "train/loss_mlm", "train/loss_itc", "train/loss_gen"):
            assert row[key] == row[key] and row[key] > 0, key
    assert [logged[s]["train/alpha"] for s in (1, 2, 3)] == pytest.approx([0.0, 0.2, 0.4])  # the after-step hook
    state = read_module_state_dict(find_checkpoint(run), "vlm")
    assert int(state["momentum_step"]) == STEPS and int(state["queue_ptr"]) == (STEPS * BATCH) % QUEUE
    assert state["visual_encoder_m.pos_embed"].dtype == torch.float32
    assert not torch.equal(state["visual_encoder_m.blocks.0.attn.qkv.weight"],
                           state["visual_encoder.blocks.0.attn.qkv.weight"])  # the copies trail the weights
