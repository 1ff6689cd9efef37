"""tools/study.py and epic/studies: the analyses' own pieces against hand-made references, and every study in
smoke mode (files and table layout)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


# ------------------------------------------------------------------------------------------------ modality bias
def tiny_meter(tokenizer):
    from epic.models.configuration_meter import METERConfig
    from epic.models.meter import METER

    cfg = METERConfig(image_size=32, patch_size=16, vit_width=32, vit_layers=1, vit_heads=2, text_hidden_size=32,
                      text_layers=1, text_heads=2, text_intermediate_size=64, hidden_size=32, num_heads=2,
                      num_fusion_layers=1, mlp_ratio=2, dropout=0.0, max_text_len=24, vocab_size=len(tokenizer),
                      pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return METER.from_config(cfg), cfg


def a_batch(shapes_world, tokenizer, size=32):
    from epic.data import build_train_loader

    loader = build_train_loader(str(shapes_world / "train" / "*.tar"), tokenizer, image_size=size, max_text_len=24,
                                batch_size=4, num_workers=0, seed=0, rank=0, world_size=1)
    return next(iter(loader))


@pytest.fixture(scope="module")
def tokenizer(shapes_world):
    from epic.data import load_tokenizer

    return load_tokenizer(shapes_world / "tokenizer")


def test_the_text_only_lm_never_sees_pixels(shapes_world, tokenizer):
    from epic.studies.modality_bias import lm_logits, text_only_lm, vlm_logits

    vlm, cfg = tiny_meter(tokenizer)
    lm = text_only_lm(cfg, seed=0).eval()
    vlm.eval()
    batch = a_batch(shapes_world, tokenizer)
    other = {**batch, "pixel_values": torch.rand_like(batch["pixel_values"])}  # two different images
    assert torch.equal(lm_logits(lm, batch), lm_logits(lm, other))
    assert not torch.allclose(vlm_logits(vlm, batch), vlm_logits(vlm, other))  # the VLM does read them


def test_the_same_masked_positions_reach_the_vlm_and_the_lm(shapes_world, tokenizer):
    from epic.studies.modality_bias import joint_step, text_only_lm

    vlm, cfg = tiny_meter(tokenizer)
    lm = text_only_lm(cfg, seed=0)
    batch = a_batch(shapes_world, tokenizer)
    seen = {}
    original_infer = vlm.infer

    def spy_infer(input_ids, attention_mask, **kwargs):
        if "mlm" not in seen and not torch.equal(input_ids, batch["input_ids"]):
            seen["mlm"] = input_ids.clone()  # the CMLM pass (the ITM pass reads the unmasked caption)
        return original_infer(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    vlm.infer = spy_infer
    lm_inputs = []
    lm.register_forward_pre_hook(lambda m, a, kw: lm_inputs.append(kw["input_ids"].clone()), with_kwargs=True)
    losses = joint_step(vlm, lm, batch, torch.Generator().manual_seed(0))
    assert set(losses) == {"vlm", "lm"} and all(torch.isfinite(v) for v in losses.values())
    assert (batch["mlm_labels"] != -100).any()
    assert torch.equal(seen["mlm"], batch["mlm_input_ids"]) and torch.equal(lm_inputs[0], batch["mlm_input_ids"])


def test_accuracy_counts_split_content_and_filler():
    from epic.studies.modality_bias import accuracies, accuracy_counts

    labels = torch.tensor([[-100, 5, 6, -100], [7, -100, 8, 9]])
    logits = torch.full((2, 4, 10), -1.0)
    for (r, c), predicted in {(0, 1): 5, (0, 2): 1, (1, 0): 7, (1, 2): 8, (1, 3): 2}.items():
        logits[r, c, predicted] = 1.0
    content = torch.tensor([[False, True, True, False], [False, False, True, True]])
    acc = accuracies(accuracy_counts(logits, labels, content))
    assert acc == {"acc": 3 / 5, "acc_content": 2 / 4, "acc_filler": 1 / 1}


# ------------------------------------------------------------------------------------------------ unmasked use
def test_corruption_ratio_is_app_a_definition():
    """Mean over sentences of (# second-round tokens not recovered) / (# tokens of the sentence)."""
    from epic.studies.unmasked_use import corruption_ratio

    original = torch.tensor([[0, 10, 11, 12, 13, 2, 1, 1], [0, 20, 21, 22, 2, 1, 1, 1]])
    corrupted = torch.tensor([[0, 10, 99, 12, 98, 2, 1, 1], [0, 20, 21, 97, 2, 1, 1, 1]])
    round2 = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 0], [0, 1, 0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    real = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    # row 0: positions 2 and 4 not recovered (3 was recovered: 12 == 12), 4 tokens -> 2/4
    # row 1: position 3 not recovered (1 was recovered), 3 tokens -> 1/3
    assert corruption_ratio(original, corrupted, round2, real) == pytest.approx((2 / 4 + 1 / 3) / 2)
    corrupted[0, 1] = 55  # a change outside round 2 (a round-1 mask) is not a corruption
    assert corruption_ratio(original, corrupted, round2, real) == pytest.approx((2 / 4 + 1 / 3) / 2)


def test_second_round_takes_tau_of_the_unmasked_tokens_only():
    from epic.studies.unmasked_use import second_round_positions

    labels = torch.full((3, 12), -100)
    labels[:, 2] = 7  # round 1 masked position 2
    real = torch.zeros(3, 12, dtype=torch.bool)
    real[:, 1:11] = True  # 10 tokens, 9 of them unmasked
    picked = second_round_positions(labels, real, 0.34, torch.Generator().manual_seed(0))
    assert picked.sum(1).tolist() == [3, 3, 3]  # round(0.34 * 9)
    assert not (picked & ~real).any() and not picked[:, 2].any()
    assert second_round_positions(labels, real, 0.0, torch.Generator()).sum() == 0


# ------------------------------------------------------------------------------------------------ grad-cam
def test_pointing_game_against_a_hand_made_map():
    from epic.studies.gradcam import inside_box, pointing_scores

    cam = torch.zeros(4, 4)  # 4x4 patches; box (0, 0)-(0.5, 0.5) = the top-left 2x2 patches
    cam[0, 0], cam[1, 1], cam[3, 3] = 3.0, 1.0, 4.0
    scores = pointing_scores(cam, (0.0, 0.0, 0.5, 0.5))
    assert scores["mass_in_box"] == pytest.approx(4.0 / 8.0)
    assert scores["pointing_hit"] == 0.0  # the maximum (3, 3) lies outside
    assert scores["box_share"] == pytest.approx(4 / 16)
    cam[0, 1] = 5.0
    assert pointing_scores(cam, (0.0, 0.0, 0.5, 0.5))["pointing_hit"] == 1.0
    assert inside_box(4, (0.3, 0.55, 0.7, 1.0)).nonzero().tolist() == [[2, 1], [2, 2], [3, 1], [3, 2]]


def test_gradcam_attention_is_the_fused_attention(shapes_world, tokenizer):
    """The explicit-softmax attention used for Grad-CAM gives the model's own outputs."""
    from epic.studies.gradcam import explicit_attention, gradcam_maps

    vlm, _ = tiny_meter(tokenizer)
    vlm.eval()
    batch = a_batch(shapes_world, tokenizer)
    args = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])
    with torch.no_grad():
        reference = vlm.infer(**args)["cls_feats"]
        with explicit_attention(vlm.cross_modal_text_layers[-1].crossattention.self, {}):
            explicit = vlm.infer(**args)["cls_feats"]
    torch.testing.assert_close(explicit, reference, atol=1e-5, rtol=1e-5)
    maps = gradcam_maps(vlm, batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                        torch.tensor([1, 2, 1, 3]))
    assert maps.shape == (4, 2, 2) and (maps >= 0).all()
