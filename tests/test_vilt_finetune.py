"""ViLT downstream through epic/finetune.py's objective and evaluator: retrieval (rank_output, random negative
captions as ViLT's draw_false_text), VQA (classification) and NLVR2 (pair formulation) train; a short VQA run
beats the untrained model."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    from epic.data.tasks import generate_shapes_tasks

    return generate_shapes_tasks(tmp_path_factory.mktemp("vilt_tasks"), n_train=128, n_val=48, image_size=32,
                                 write_shards=False)


def vilt_task_setup(task, tasks_dir, tokenizer):
    from epic.finetune import fill_task_paths
    from epic.finetune_config import TaskConfig, build_dataclass
    from epic.models.registry import build_task_model
    from epic.models.vilt import ViLTConfig

    cfg = build_dataclass(TaskConfig, {"data": {"image_size": 32, "max_text_len": 24, "randaugment": False},
                                       "eval": {"batch_size": 64},
                                       "finetune": {"task": task, "shapes": str(tasks_dir), "num_negatives": 7}})
    cfg.model = ViLTConfig(hidden_size=64, num_layers=2, num_heads=2, mlp_ratio=2, image_size=32, patch_size=8,
                           vocab_size=len(tokenizer), max_text_len=24, pad_token_id=tokenizer.pad_token_id,
                           drop_rate=0.0, initializer_range=0.08, num_token_types=3 if task == "nlvr2" else 2)
    fill_task_paths(cfg)
    torch.manual_seed(0)
    return cfg, build_task_model(task, cfg.model, cfg.finetune.num_answers)


def train(cfg, model, tokenizer, steps, lr):
    from epic.data.tasks import build_task_train_loader
    from epic.finetune import TaskObjective, load_split, random_negative_texts

    loader = build_task_train_loader(load_split(cfg, "train", True), tokenizer, image_size=32, max_text_len=24,
                                     batch_size=16, seed=0, rank=0, world_size=1, randaugment=False,
                                     num_negative_texts=random_negative_texts(cfg))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    objective, rng = TaskObjective(cfg), torch.Generator().manual_seed(0)
    outs = []
    for step, batch in zip(range(steps), loader):
        out = objective.losses(model, batch, rng, step)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        outs.append(out)
    return outs


@pytest.mark.parametrize("task", ["retrieval", "nlvr2", "vqa"])
def test_vilt_task_models_train_through_the_finetune_objective(task, tasks, shapes_world):
    from epic.data import load_tokenizer
    from epic.finetune import evaluate_split

    tokenizer = load_tokenizer(shapes_world / "tokenizer")
    cfg, model = vilt_task_setup(task, tasks, tokenizer)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        before = evaluate_split(model, cfg, tokenizer, "val", 0, 1)
        outs = train(cfg, model, tokenizer, steps=100 if task == "vqa" else 3, lr=2e-3)
        after = evaluate_split(model, cfg, tokenizer, "val", 0, 1)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.isfinite(out["loss"]) for out in outs)
    if task == "vqa":  # a short run beats the untrained model (as METER's in test_finetune.py)
        assert after["vqa_score"] >= before["vqa_score"] + 10.0, (before, after)
    elif task == "retrieval":
        assert {"tr_r1", "ir_r1"} <= set(after) and not model._modules["itm_score"].fc.weight.requires_grad
    else:
        assert 0.0 <= after["accuracy"] <= 100.0
