"""X-VLM: forward against an independent forward written from the official code's structure, on a synthetic
checkpoint with every official key; the official-key round trip; region features; box losses; X-VLM's masking;
the shapes world's region boxes; the recipe's losses."""
from __future__ import annotations

import dataclasses
import json
import math
import random
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from launch import free_port
from epic.data.regions import box_patch_mask, normalise_box, region_example
from epic.data.xvlm_masking import mask_batch, mask_caption, num_masks
from epic.models.xvlm import XVLM, XVLMConfig, load_official_xvlm, to_official_state_dict
from epic.models.xvlm.convert_xvlm import XVLMConversionError, xvlm_config_from_official
from epic.objectives.box import box_cxcywh_to_xyxy, box_regression_losses, generalized_box_iou
from epic.objectives.xvlm import (caption_batch_losses, contrastive_loss, is_region_step, matching_loss,
                                  region_batch_losses)

# X-VLM's own config layout (Pretrain_XVLM_base_4m.yaml keys; vision_config / text_config as dicts), tiny sizes.
OFFICIAL_CONFIG = {
    "use_clip_vit": False, "use_swin": True, "image_res": 64, "patch_size": 16, "use_roberta": False,
    "vision_config": {"vision_width": 64, "image_res": 64, "window_size": 4, "embed_dim": 16, "depths": [2, 2, 2],
                      "num_heads": [1, 2, 2]},
    "text_config": {"architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
                    "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
                    "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert",
                    "num_attention_heads": 2, "num_hidden_layers": 4, "pad_token_id": 0, "type_vocab_size": 2,
                    "vocab_size": 100, "fusion_layer": 2, "encoder_width": 64},
    "embed_dim": 16, "temp": 0.07, "mask_prob": 0.25, "max_masks": 8,
    "regions": {"iter_perc": 0.5, "batch_size": 128, "max_images": 48, "max_regions": 5, "min_perc_in_image": 0.5},
    "optimizer": {"opt": "adamW", "lr": 1e-4, "weight_decay": 0.01, "lr_mult": 2},
}


# ------------------------------------------------------------------------------------ synthetic checkpoint
def official_swin(seed: int):
    """A Swin with X-VLM's settings as the shared tower, and its weights under Microsoft's names (patch merging
    at the end of a stage; relative_position_index and attn_mask buffers stored)."""
    from timm.models.swin_transformer import SwinTransformer

    v = OFFICIAL_CONFIG["vision_config"]
    torch.manual_seed(seed)
    swin = SwinTransformer(img_size=64, patch_size=4, num_classes=0, global_pool="", embed_dim=v["embed_dim"],
                           depths=tuple(v["depths"]), num_heads=tuple(v["num_heads"]), window_size=v["window_size"],
                           drop_path_rate=0.0).eval()
    with torch.no_grad():
        for p in swin.parameters():
            p.add_(torch.randn_like(p) * 0.05)

    def microsoft(name):
        parts = name.split(".")
        if len(parts) > 2 and parts[0] == "layers" and parts[2] == "downsample":
            parts[1] = str(int(parts[1]) - 1)
        return "vision_encoder." + ".".join(parts)

    state = {microsoft(k): v.clone() for k, v in swin.state_dict().items()}
    state.update({microsoft(k): b.clone() for k, b in swin.named_buffers()
                  if k.endswith(("relative_position_index", "attn_mask"))})
    return swin, state


def official_text_and_heads(seed: int) -> dict:
    """xbert + X-VLM head keys, written out from the official modules, with random values."""
    t = OFFICIAL_CONFIG["text_config"]
    H, I, V, P = t["hidden_size"], t["intermediate_size"], t["vocab_size"], t["max_position_embeddings"]
    C, D = OFFICIAL_CONFIG["vision_config"]["vision_width"], OFFICIAL_CONFIG["embed_dim"]
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def linear(name, n_in, n_out):
        sd[name + ".weight"] = torch.randn(n_out, n_in, generator=g) * 0.2
        sd[name + ".bias"] = torch.randn(n_out, generator=g) * 0.05

    def norm(name, n):
        sd[name + ".weight"] = 1 + torch.randn(n, generator=g) * 0.1
        sd[name + ".bias"] = torch.randn(n, generator=g) * 0.05

    e = "text_encoder.bert.embeddings."
    sd[e + "word_embeddings.weight"] = torch.randn(V, H, generator=g) * 0.5
    sd[e + "position_embeddings.weight"] = torch.randn(P, H, generator=g) * 0.5
    sd[e + "token_type_embeddings.weight"] = torch.randn(2, H, generator=g) * 0.5
    norm(e + "LayerNorm", H)
    sd[e + "position_ids"] = torch.arange(P)[None]
    for i in range(t["num_hidden_layers"]):
        pre = f"text_encoder.bert.encoder.layer.{i}."
        blocks = [("attention", H)] + ([("crossattention", C)] if i >= t["fusion_layer"] else [])
        for block, kv in blocks:
            linear(pre + block + ".self.query", H, H)
            linear(pre + block + ".self.key", kv, H)
            linear(pre + block + ".self.value", kv, H)
            linear(pre + block + ".output.dense", H, H)
            norm(pre + block + ".output.LayerNorm", H)
        linear(pre + "intermediate.dense", H, I)
        linear(pre + "output.dense", I, H)
        norm(pre + "output.LayerNorm", H)
    m = "text_encoder.cls.predictions."
    linear(m + "transform.dense", H, H)
    norm(m + "transform.LayerNorm", H)
    sd[m + "bias"] = torch.randn(V, generator=g) * 0.05
    sd[m + "decoder.weight"] = sd[e + "word_embeddings.weight"]
    sd[m + "decoder.bias"] = sd[m + "bias"]
    linear("vision_proj", C, D)
    linear("text_proj", H, D)
    sd["temp"] = torch.tensor(0.07)
    for head, out in (("itm_head", 2), ("bbox_head", 4)):
        linear(head + ".0", H, 2 * H)
        norm(head + ".1", 2 * H)
        linear(head + ".3", 2 * H, out)
    return sd


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(path of a synthetic X-VLM checkpoint {'model', 'config'}, its state dict, the reference Swin)."""
    swin, state = official_swin(0)
    state.update(official_text_and_heads(1))
    path = tmp_path_factory.mktemp("xvlm") / "4m_base_model_state_step_199999.th"
    torch.save({"model": state, "config": OFFICIAL_CONFIG}, path)
    return path, state, swin


# ------------------------------------------------------------------------- the independent reference forward
def ref_attention(x, ctx, mask_add, sd, pre, heads):
    B, T, H = x.shape
    dh = H // heads

    def proj(name, inp):
        return (inp @ sd[f"{pre}.self.{name}.weight"].t() + sd[f"{pre}.self.{name}.bias"]).view(
            B, inp.shape[1], heads, dh).permute(0, 2, 1, 3)

    q, k, v = proj("query", x), proj("key", ctx), proj("value", ctx)
    scores = q @ k.transpose(-1, -2) / math.sqrt(dh) + mask_add
    out = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(B, T, H)
    out = out @ sd[f"{pre}.output.dense.weight"].t() + sd[f"{pre}.output.dense.bias"]
    return F.layer_norm(out + x, (H,), sd[f"{pre}.output.LayerNorm.weight"], sd[f"{pre}.output.LayerNorm.bias"], 1e-12)


def ref_layer(x, mask_add, sd, i, image=None, image_add=None, heads=2):
    pre = f"text_encoder.bert.encoder.layer.{i}"
    x = ref_attention(x, x, mask_add, sd, pre + ".attention", heads)
    if image is not None:
        x = ref_attention(x, image, image_add, sd, pre + ".crossattention", heads)
    h = F.gelu(x @ sd[pre + ".intermediate.dense.weight"].t() + sd[pre + ".intermediate.dense.bias"])
    h = h @ sd[pre + ".output.dense.weight"].t() + sd[pre + ".output.dense.bias"]
    return F.layer_norm(h + x, (x.shape[-1],), sd[pre + ".output.LayerNorm.weight"], sd[pre + ".output.LayerNorm.bias"],
                        1e-12)


def ref_mlp(x, sd, name):
    h = x @ sd[name + ".0.weight"].t() + sd[name + ".0.bias"]
    h = F.gelu(F.layer_norm(h, (h.shape[-1],), sd[name + ".1.weight"], sd[name + ".1.bias"], 1e-5))
    return h @ sd[name + ".3.weight"].t() + sd[name + ".3.bias"]


def reference_forward(sd, swin, pixel_values, input_ids, text_atts, image_atts=None):
    """X-VLM's forward as its code does it: Swin tokens with an average-pooled token in front (recomputed over the
    region's patches when image_atts is given), BERT text mode, fusion mode, heads; masks as (1 - m) * -10000."""
    t = OFFICIAL_CONFIG["text_config"]
    x = swin.forward_features(pixel_values)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    x_cls = torch.nn.AdaptiveAvgPool1d(1)(x.transpose(1, 2))  # B C 1
    if image_atts is not None:
        w = image_atts[:, 1:].unsqueeze(2).float()
        x_cls = (w * x).transpose(1, 2).sum(-1, keepdim=True) / w.transpose(1, 2).sum(-1, keepdim=True)
    image_embeds = torch.cat([x_cls.transpose(1, 2), x], 1)
    if image_atts is None:
        image_atts = torch.ones(image_embeds.shape[:2], dtype=torch.long)
    e = "text_encoder.bert.embeddings."
    L = input_ids.shape[1]
    h = sd[e + "word_embeddings.weight"][input_ids] + sd[e + "token_type_embeddings.weight"][0] + \
        sd[e + "position_embeddings.weight"][:L]
    h = F.layer_norm(h, (h.shape[-1],), sd[e + "LayerNorm.weight"], sd[e + "LayerNorm.bias"], 1e-12)
    mask_add = (1.0 - text_atts[:, None, None, :].float()) * -10000.0
    image_add = (1.0 - image_atts[:, None, None, :].float()) * -10000.0
    states = []
    for i in range(t["fusion_layer"]):
        h = ref_layer(h, mask_add, sd, i)
    text_embeds = h
    for i in range(t["fusion_layer"], t["num_hidden_layers"]):
        states.append(h)
        h = ref_layer(h, mask_add, sd, i, image_embeds, image_add)
    m = "text_encoder.cls.predictions."
    tr = F.gelu(h @ sd[m + "transform.dense.weight"].t() + sd[m + "transform.dense.bias"])
    tr = F.layer_norm(tr, (tr.shape[-1],), sd[m + "transform.LayerNorm.weight"], sd[m + "transform.LayerNorm.bias"],
                      1e-12)
    return {
        "image_embeds": image_embeds, "text_embeds": text_embeds, "text_feats": h, "cls_feats": h[:, 0],
        "image_feat": F.normalize(image_embeds[:, 0] @ sd["vision_proj.weight"].t() + sd["vision_proj.bias"], dim=-1),
        "text_feat": F.normalize(text_embeds[:, 0] @ sd["text_proj.weight"].t() + sd["text_proj.bias"], dim=-1),
        "itm": ref_mlp(h[:, 0], sd, "itm_head"), "bbox": ref_mlp(h[:, 0], sd, "bbox_head").sigmoid(),
        "mlm": tr @ sd[m + "decoder.weight"].t() + sd[m + "decoder.bias"],
        "fusion_inputs": states,
    }


def assert_rel(actual, expected, tol=1e-5):
    err = (actual - expected).abs().max().item() / max(expected.abs().max().item(), 1e-12)
    assert err <= tol, f"relative error {err:.2e} > {tol}"


def batch(seed=0, B=3, L=9):
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(B, 3, 64, 64, generator=g)
    input_ids = torch.randint(5, 100, (B, L), generator=g)
    input_ids[:, 0] = 2
    atts = torch.ones(B, L, dtype=torch.long)
    atts[1, 6:] = 0
    atts[2, 4:] = 0
    return pixel_values, input_ids, atts


# ---------------------------------------------------------------------------------------------------- tests
@torch.no_grad()
def test_forward_matches_reference_on_official_checkpoint(official):
    path, sd, swin = official
    model = load_official_xvlm(str(path))  # the config stored in the checkpoint is used
    pixel_values, input_ids, atts = batch()
    out = model.infer(pixel_values=pixel_values, input_ids=input_ids, attention_mask=atts)
    ref = reference_forward(sd, swin, pixel_values, input_ids, atts)
    for key in ("image_embeds", "text_embeds", "text_feats", "cls_feats", "image_feat", "text_feat"):
        assert out[key].shape == ref[key].shape, key
        assert_rel(out[key], ref[key])
    assert_rel(model.itm_score(out["cls_feats"]), ref["itm"])
    assert_rel(model.mlm_score(out["text_feats"]), ref["mlm"])
    assert_rel(model.predict_bbox(pixel_values=pixel_values, input_ids=input_ids, attention_mask=atts), ref["bbox"])
    # reusing encode_image gives the same result
    again = model.infer(input_ids, atts, image_embeds=model.encode_image(pixel_values))
    assert torch.equal(again["text_feats"], out["text_feats"])
    # through the family registry (what the teacher loader and tools/convert_official.py call)
    from epic.models.registry import load_official, official_config

    assert official_config("xvlm", str(path)) == model.config
    via_registry = load_official("xvlm", str(path)).eval()
    assert torch.equal(via_registry.infer(input_ids, atts, pixel_values=pixel_values)["text_feats"], out["text_feats"])


@torch.no_grad()
def test_saliency_queries_match_reference(official):
    path, sd, swin = official
    pixel_values, input_ids, atts = batch(1)
    ref = reference_forward(sd, swin, pixel_values, input_ids, atts)
    hidden = ref["fusion_inputs"][-2]  # input of the penultimate fusion layer
    pre, heads = "text_encoder.bert.encoder.layer.2", 2

    def split(x):
        return x.view(*x.shape[:-1], heads, -1).transpose(-3, -2) if x.dim() == 3 else x.view(x.shape[0], heads, -1)

    model = load_official_xvlm(str(path), saliency_query="fused_cls")
    q, k = model.saliency_qk(input_ids, atts, pixel_values=pixel_values)
    assert_rel(q, split(hidden[:, 0] @ sd[pre + ".attention.self.query.weight"].t() + sd[pre + ".attention.self.query.bias"]))
    assert_rel(k, split(hidden @ sd[pre + ".attention.self.key.weight"].t() + sd[pre + ".attention.self.key.bias"]))
    teacher = model.saliency_teacher()
    assert not any(p.requires_grad for p in teacher.parameters()) and not hasattr(teacher, "itm_head")
    tq, tk = teacher.saliency_qk(input_ids, atts, pixel_values=pixel_values)
    assert torch.equal(tq, q) and torch.equal(tk, k)

    model = load_official_xvlm(str(path), saliency_query="image_cls_cross")
    q, k = model.saliency_qk(input_ids, atts, pixel_values=pixel_values)
    mask_add = (1.0 - atts[:, None, None, :].float()) * -10000.0
    states = ref_attention(hidden, hidden, mask_add, sd, pre + ".attention", heads)
    image_cls = ref["image_embeds"][:, 0]
    c = pre + ".crossattention.self."
    assert_rel(q, split(image_cls @ sd[c + "key.weight"].t() + sd[c + "key.bias"]))
    assert_rel(k, split(states @ sd[c + "query.weight"].t() + sd[c + "query.bias"]))


def test_official_key_round_trip_and_errors(official, tmp_path):
    path, sd, _ = official
    model = load_official_xvlm(str(path))
    back = to_official_state_dict(model)
    assert set(back) == set(sd)
    for key, value in sd.items():
        assert torch.equal(back[key].to(value.dtype), value), key
    # ours -> files -> ours
    model.save_pretrained(str(tmp_path / "export"))
    again = XVLM.from_pretrained(str(tmp_path / "export"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    # unknown and missing keys name themselves
    bad = dict(sd, **{"text_encoder.bert.pooler.dense.weight": torch.zeros(1)})
    torch.save({"model": bad, "config": OFFICIAL_CONFIG}, tmp_path / "unknown.th")
    with pytest.raises(XVLMConversionError, match="pooler"):
        load_official_xvlm(str(tmp_path / "unknown.th"))
    short = {k: v for k, v in sd.items() if not k.startswith("bbox_head.")}
    torch.save({"model": short}, tmp_path / "missing.th")
    with pytest.raises(XVLMConversionError, match="bbox_head"):
        load_official_xvlm(str(tmp_path / "missing.th"), OFFICIAL_CONFIG)  # no stored config: the argument is used
    with pytest.raises(XVLMConversionError, match="carries no usable config"):
        load_official_xvlm(str(tmp_path / "missing.th"))
    (tmp_path / "cfg.json").write_text(json.dumps(OFFICIAL_CONFIG))
    assert xvlm_config_from_official(str(tmp_path / "cfg.json")).fusion_layer == 2
    with pytest.raises(XVLMConversionError, match="path"):
        xvlm_config_from_official(dict(OFFICIAL_CONFIG, vision_config="configs/config_swinB_224.json"))


def test_base_config_is_x_vlm_base():
    cfg = XVLMConfig()
    assert (cfg.image_grid, cfg.vision_width, cfg.num_image_tokens, cfg.image_stride) == (7, 1024, 50, 32)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.fusion_layer, cfg.embed_dim, cfg.temp) == (768, 12, 6, 256, 0.07)
    with torch.device("meta"):
        model = XVLM(cfg)
    count = sum(p.numel() for p in model.parameters())
    assert 200e6 < count < 230e6, count  # X-VLM-base: 216M (anchors.md)


@torch.no_grad()
def test_region_features_select_exactly_the_box_patches(official):
    path, sd, swin = official
    model = load_official_xvlm(str(path))
    pixel_values, input_ids, atts = batch(2)
    grid = model.config.image_grid  # 4 x 4 patches of 16 px
    boxes = [[0, 0, 64, 64], [17, 3, 20, 10], [40, 40, 5, 5]]  # pixels of the 64 px input
    image_atts = torch.tensor([box_patch_mask(*b, image_size=64, grid=grid) for b in boxes])
    # hand-made expectations: columns/rows the box touches
    expected = {1: {(0, 1), (0, 2)}, 2: {(2, 2)}}
    for row, cells in expected.items():
        assert {(i // grid, i % grid) for i in range(grid * grid) if image_atts[row, 1 + i]} == cells
    assert image_atts[0].sum() == 1 + grid * grid and image_atts[:, 0].eq(1).all()

    out = model.infer(input_ids, atts, pixel_values=pixel_values, image_atts=image_atts)
    ref = reference_forward(sd, swin, pixel_values, input_ids, atts, image_atts)
    for key in ("image_embeds", "text_feats", "image_feat"):
        assert_rel(out[key], ref[key])
    tokens = model.encode_image(pixel_values)[:, 1:]
    for row in range(3):
        inside = image_atts[row, 1:].bool()
        assert torch.allclose(out["image_embeds"][row, 0], tokens[row, inside].mean(0), atol=1e-6)
    # changing the tokens outside a box leaves the region's fused states unchanged; inside, it changes them
    image_embeds = model.encode_image(pixel_values)
    perturbed = image_embeds.clone()
    outside = torch.cat([torch.zeros(3, 1, dtype=torch.bool), ~image_atts[:, 1:].bool()], 1)
    perturbed[outside] += 5.0
    moved = model.infer(input_ids, atts, image_embeds=perturbed, image_atts=image_atts)
    assert torch.allclose(moved["text_feats"][1:], out["text_feats"][1:], atol=1e-5)
    inside_one = image_embeds.clone()
    inside_one[1, 1 + 1] += 5.0  # patch (0, 1) is in box 1
    assert not torch.allclose(model.infer(input_ids, atts, image_embeds=inside_one, image_atts=image_atts)["text_feats"][1],
                              out["text_feats"][1], atol=1e-3)


def test_param_groups_follow_x_vlm_optimizer():
    model = XVLM(XVLMConfig.tiny(consistency_head=True))
    spec = model.param_groups_spec()
    names = {n for g in spec.values() for part in g.values() for n in part}
    assert names == {n for n, _ in model.named_parameters()}
    new = {n for n, _ in model.named_parameters()
           if ".crossattention." in n or n.split(".")[0] in ("vision_proj", "text_proj", "temp", "itm_head", "bbox_head",
                                                             "itc_score")}
    assert set(spec["fusion"]["decay"] + spec["fusion"]["no_decay"] + spec["head"]["decay"] + spec["head"]["no_decay"]) == new
    assert all(".crossattention." in n for n in spec["fusion"]["decay"] + spec["fusion"]["no_decay"])
    no_decay = {n for g in spec.values() for n in g["no_decay"]}
    assert "temp" not in no_decay and "text_encoder.bert.embeddings.LayerNorm.weight" in no_decay
    assert any("relative_position_bias_table" in n for n in no_decay)  # "bias" substring, as X-VLM's optim.py


# --------------------------------------------------------------------------------------------------- boxes
def test_generalized_iou_against_hand_computation():
    s = 4.0  # corner boxes on a 4 x 4 canvas, normalised by s
    a = torch.tensor([[0, 0, 2, 2], [0, 0, 1, 1], [0, 0, 4, 4], [0, 0, 2, 2.]]) / s
    b = torch.tensor([[0, 0, 2, 2], [2, 0, 3, 1], [1, 1, 2, 2], [1, 1, 3, 3.]]) / s
    expected = torch.tensor([1.0, 0 - (3 - 2) / 3, 1 / 16 - 0, 1 / 7 - (9 - 7) / 9])  # identical, disjoint, nested, partial
    assert torch.allclose(generalized_box_iou(a, b), expected, atol=1e-6)
    assert torch.allclose(generalized_box_iou(b, a), expected, atol=1e-6)

    def cxcywh(xyxy):
        return torch.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2, xyxy[:, 2] - xyxy[:, 0],
                            xyxy[:, 3] - xyxy[:, 1]], -1)

    assert torch.allclose(box_cxcywh_to_xyxy(cxcywh(a)), a)
    pred, target = cxcywh(a), cxcywh(b)
    l1, giou = box_regression_losses(pred, target)
    assert torch.allclose(l1, (pred - target).abs().sum() / 4) and torch.allclose(giou, (1 - expected).sum() / 4)
    is_image = torch.tensor([0, 1, 1, 0])  # whole-image rows leave the box losses
    l1, giou = box_regression_losses(pred, target, is_image)
    assert torch.allclose(giou, ((1 - expected[0]) + (1 - expected[3])) / 2)
    assert torch.allclose(l1, ((pred - target).abs().sum(-1)[[0, 3]]).sum() / 2)
    zero_l1, zero_giou = box_regression_losses(pred, target, torch.ones(4))
    assert zero_l1 == 0 and zero_giou == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.01, 0.99), min_size=8, max_size=8))
def test_generalized_iou_properties(v):
    a = torch.tensor([[min(v[0], v[1]), min(v[2], v[3]), max(v[0], v[1]) + 1e-3, max(v[2], v[3]) + 1e-3]])
    b = torch.tensor([[min(v[4], v[5]), min(v[6], v[7]), max(v[4], v[5]) + 1e-3, max(v[6], v[7]) + 1e-3]])
    from epic.objectives.box import paired_box_iou

    giou, iou = generalized_box_iou(a, b), paired_box_iou(a, b)[0]
    assert -1 - 1e-6 <= giou <= iou + 1e-6 and torch.allclose(giou, generalized_box_iou(b, a))
    assert torch.allclose(generalized_box_iou(a, a), torch.ones(1))


def test_box_normalisation_and_region_example():
    assert normalise_box(10, 20, 30, 40, 100, 200) == [0.25, 0.2, 0.3, 0.2]
    from PIL import Image

    image = Image.new("RGB", (100, 80))
    regions = [{"caption": "the red circle", "bbox": [10, 10, 20, 20]}, {"caption": "a dog", "bbox": [60, 40, 30, 30],
                                                                          "attributes": ["brown"]}]
    for seed in range(20):
        out, rows = region_example(image, regions, ["an image"], random.Random(seed), image_size=64, grid=4)
        assert out.size == (64, 64) and rows[0].is_image == 1 and rows[0].target_bbox == [0.5, 0.5, 1.0, 1.0]
        for row in rows[1:]:
            cx, cy, w, h = row.target_bbox
            assert 0 < w <= 1 and 0 < h <= 1 and 0 <= cx - w / 2 + 1e-9 and cx + w / 2 <= 1 + 1e-9
            assert row.image_atts[0] == 1 and sum(row.image_atts) >= 2
            assert row.caption in ("the red circle", "brown a dog")


# ------------------------------------------------------------------------------------------------- masking
def test_x_vlm_masking():
    assert [num_masks(n, 0.25, 8) for n in (2, 5, 7, 20, 40, 60)] == [1, 1, 2, 5, 8, 8]
    rng = random.Random(0)
    L = 20
    special = [True] + [False] * 12 + [True] * 7  # <s>, 12 words, </s> + padding
    ids = list(range(10, 10 + L))
    counts = {"mask": 0, "random": 0, "kept": 0}
    for _ in range(400):
        masked, labels = mask_caption(ids, special, rng, mask_token_id=4, vocab_size=1000)
        chosen = [i for i, l in enumerate(labels) if l != -100]
        assert len(chosen) == num_masks(13, 0.25, 8) == 3 and not any(special[i] for i in chosen)
        assert all(labels[i] == ids[i] for i in chosen)
        assert all(masked[i] == ids[i] for i in range(L) if i not in chosen)
        for i in chosen:
            counts["mask" if masked[i] == 4 else "kept" if masked[i] == ids[i] else "random"] += 1
    total = sum(counts.values())
    assert abs(counts["mask"] / total - 0.8) < 0.05 and abs(counts["random"] / total - 0.1) < 0.04
    # whole words: with continuation pieces a masked piece brings its word (no truncation when n is large)
    starts = [True, True, False, True, False, False, True, True] + [True] * 4
    special = [True] + [False] * 7 + [True] * 4
    for seed in range(50):
        _, labels = mask_caption(list(range(12)), special, random.Random(seed), 4, 100, mask_prob=1.0, max_masks=8,
                                 word_start=starts, skipgram_prb=0.0)
        chosen = {i for i, l in enumerate(labels) if l != -100}
        assert chosen == set(range(1, 8))
    out_ids, out_labels = mask_batch(torch.tensor([ids, ids]), torch.tensor([[False] * 13 + [True] * 7] * 2),
                                     random.Random(1), 4, 1000)
    assert out_ids.shape == (2, L) and ((out_labels != -100).sum(1) <= 8).all()


# ----------------------------------------------------------------------------------------- shapes world
def test_shapes_world_region_boxes_cover_the_drawn_shapes(shapes_world):
    from epic.data.synthetic import render_scene

    with tarfile.open(shapes_world / "train" / "00000.tar") as tar:
        metas = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    size = 64
    for meta in metas[:40]:
        assert len(meta["regions"]) == len(meta["objects"])
        captions = [r["caption"] for r in meta["regions"]]
        assert len(set(captions)) == len(captions)  # a region caption names one object of the image
        for obj, region in zip(meta["objects"], meta["regions"]):
            assert region["caption"].startswith(f"the {obj['size']} {obj['colour']} {obj['shape']}")
            assert len(region["content_words"]) == len(region["caption"].split())
            alone = np.asarray(render_scene(dict(meta, objects=[obj]), size)).astype(int)
            empty = np.asarray(render_scene(dict(meta, objects=[]), size)).astype(int)
            ys, xs = np.nonzero((alone != empty).any(-1))
            x, y, w, h = region["bbox"]
            assert xs.min() >= x and ys.min() >= y and xs.max() < x + w and ys.max() < y + h  # covers every pixel
            assert xs.min() - x <= 1 and ys.min() - y <= 1 and x + w - xs.max() <= 2 and y + h - ys.max() <= 2  # tight


# ------------------------------------------------------------------------------------------------ recipe
def test_interleave_is_a_function_of_the_step():
    steps = [is_region_step(s, 0.5) for s in range(100)]
    assert sum(steps) == 50 and steps == [is_region_step(s, 0.5) for s in range(100)]
    assert sum(is_region_step(s, 0.25) for s in range(400)) == 100
    assert not any(is_region_step(s, 0.0) for s in range(10)) and all(is_region_step(s, 1.0) for s in range(10))


def test_contrastive_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    image, text = F.normalize(torch.randn(4, 8, generator=g), dim=-1), F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    temp = torch.tensor(0.07)
    logits = image @ text.t() / temp
    by_hand = -(logits.log_softmax(1).diag().mean() + logits.t().log_softmax(1).diag().mean()) / 2
    assert torch.allclose(contrastive_loss(image, text, temp), by_hand)
    idx = torch.tensor([0, 0, 1, 2])  # rows 0 and 1 show the same image
    pos = (idx[:, None] == idx[None]).float()
    target = pos / pos.sum(1, keepdim=True)
    by_hand = -((logits.log_softmax(1) * target).sum(1).mean() + (logits.t().log_softmax(1) * target).sum(1).mean()) / 2
    assert torch.allclose(contrastive_loss(image, text, temp, idx), by_hand)


def test_recipe_losses_run_and_backpropagate():
    torch.manual_seed(0)
    model = XVLM(XVLMConfig.tiny(vocab_size=100))
    pixel_values, input_ids, atts = batch(3, B=4)
    pixel_values, input_ids, atts = pixel_values[:, :, :64, :64], input_ids, atts
    mlm_ids, mlm_labels = mask_batch(input_ids, atts == 0, random.Random(0), 4, 100)
    mlm_labels[:, 0] = -100
    g = torch.Generator().manual_seed(0)
    out = caption_batch_losses(model, {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": atts,
                                       "mlm_input_ids": mlm_ids, "mlm_labels": mlm_labels}, g)
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    out["loss"].backward()
    assert model.temp.grad is not None and model.itm_head[0].weight.grad.abs().sum() > 0
    model.zero_grad()
    grid = model.config.image_grid
    image_atts = torch.tensor([[1] * (1 + grid * grid), box_patch_mask(0, 0, 20, 20, 64, grid),
                               box_patch_mask(30, 30, 30, 30, 64, grid), box_patch_mask(5, 40, 10, 20, 64, grid)])
    region = {"pixel_values": pixel_values[:2], "image_index": torch.tensor([0, 0, 1, 1]), "input_ids": input_ids,
              "attention_mask": atts, "mlm_input_ids": mlm_ids, "mlm_labels": mlm_labels, "image_atts": image_atts,
              "target_bbox": torch.tensor([[0.5, 0.5, 1, 1], [0.15, 0.15, 0.3, 0.3], [0.7, 0.7, 0.47, 0.47],
                                           [0.15, 0.78, 0.15, 0.3]]), "is_image": torch.tensor([1, 0, 0, 0])}
    out = region_batch_losses(model, region, g)
    assert torch.isfinite(out["loss"]) and out["bbox_giou"] > 0
    out["loss"].backward()
    assert model.bbox_head[3].weight.grad.abs().sum() > 0
    # hard negatives never pick the positive
    image_embeds = model.encode_image(pixel_values)
    text_embeds = model.encode_text(input_ids, atts)
    loss, _ = matching_loss(model, image_embeds, torch.ones(image_embeds.shape[:2], dtype=torch.long),
                            model.image_features(image_embeds), text_embeds, atts, model.text_features(text_embeds), g)
    assert torch.isfinite(loss)


# ------------------------------------------------------------------------------------------ data plumbing
def test_make_shards_regions_from_x_vlm_layout_and_coco_instances(tmp_path):
    import importlib.util
    import io
    from pathlib import Path

    from PIL import Image

    from epic.data.regions import decode_region_sample
    from epic.data.shards import decode_sample

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("make_shards", root / "tools" / "make_shards.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "b.jpg"):
        buffer = io.BytesIO()
        Image.new("RGB", (40, 30), (200, 0, 0)).save(buffer, format="JPEG")
        (images / name).write_bytes(buffer.getvalue())
    xvlm = [{"image": "a.jpg", "caption": "a red picture",
             "elems": [{"caption": "shirt", "bb": [1, 2, 10, 8], "attributes": ["white"]},
                       {"caption": "outside", "bb": [35, 25, 30, 30]}]}]  # leaves the image: dropped
    coco = {"images": [{"id": 7, "file_name": "b.jpg"}], "categories": [{"id": 1, "name": "dog"}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [5.5, 4, 20, 12], "iscrowd": 0},
                            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 40, 30], "iscrowd": 1}]}
    (tmp_path / "objs.json").write_text(json.dumps(xvlm))
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    out = tmp_path / "shards"
    assert tool.main(["--regions", "--annotations", str(tmp_path / "objs.json"), "--coco-instances",
                      str(tmp_path / "instances.json"), "--image-root", str(images), "--out", str(out),
                      "--no-shuffle", "--workers", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["written"] == 2 and report["regions"] == 2 and report["regions_dropped"] == 1
    raw = {}
    with tarfile.open(out / "00000.tar") as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            raw.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    first, second = (raw[k] for k in sorted(raw))
    image, regions, captions = decode_region_sample(first)
    assert captions == ["a red picture"] and regions == [{"caption": "shirt", "bbox": [1.0, 2.0, 10.0, 8.0],
                                                          "attributes": ["white"]}]
    assert decode_sample(first).regions == regions  # the caption decoder exposes them too
    image, regions, captions = decode_region_sample(second)
    assert captions == [] and regions == [{"caption": "dog", "bbox": [5.5, 4.0, 20.0, 12.0]}]
    assert decode_sample(second) == "empty_caption"  # a region-only sample is not a caption sample


def test_collate_region_batch(shapes_world):
    from epic.data.regions import collate_region_batch, decode_region_sample
    from epic.data.text import load_tokenizer
    from epic.data.transforms import eval_transform

    tokenizer = load_tokenizer(shapes_world / "tokenizer")
    raw = {}
    with tarfile.open(shapes_world / "train" / "00000.tar") as tar:
        for member in tar.getmembers()[:30]:
            key, ext = member.name.split(".", 1)
            raw.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    rng = random.Random(0)
    examples = []
    for sample in list(raw.values())[:6]:
        decoded = decode_region_sample(sample)
        if isinstance(decoded, str):
            continue
        image, regions, captions = decoded
        crop, rows = region_example(image, regions, captions, rng, image_size=64, grid=8, hflip=False)
        examples.append((eval_transform(64)(crop), rows))
    batch = collate_region_batch(examples, tokenizer, 32, rng, batch_size=12)
    assert batch["pixel_values"].shape[1:] == (3, 64, 64) and batch["image_index"].max() < len(batch["pixel_values"])
    assert batch["image_atts"].shape == (12, 65) and batch["target_bbox"].shape == (12, 4)
    assert ((batch["mlm_labels"] != -100).sum(1) >= 1).all() and ((batch["mlm_labels"] != -100).sum(1) <= 8).all()
    assert torch.equal(batch["target_bbox"][batch["is_image"] == 1], torch.tensor([[0.5, 0.5, 1, 1.]]).expand(
        int(batch["is_image"].sum()), 4))


def test_configs_x_vlm_recipe_and_epic_differs_only_in_epic():
    from pathlib import Path

    import yaml

    folder = Path(__file__).resolve().parents[1] / "epic" / "configs"

    def read(name):
        return yaml.safe_load((folder / f"{name}.yaml").read_text())

    base = read("xvlm_4m")
    assert base["model"]["family"] == "xvlm" and base["train"]["global_batch_size"] == 1024
    assert (base["train"]["lr"], base["train"]["weight_decay"], base["train"]["lr_mult_fusion"],
            base["train"]["lr_mult_head"], base["train"]["grad_clip"]) == (1e-4, 0.01, 2.0, 2.0, 1.0)
    assert base["train"]["max_steps"] * base["train"]["warmup_ratio"] == 2500
    assert read("xvlm_16m")["train"]["global_batch_size"] == 3072
    for baseline in ("xvlm_4m", "xvlm_16m", "xvlm_shapes_tiny"):
        epic = read("epic_" + baseline)
        assert epic["extends"] == baseline and set(epic) <= {"extends", "run", "epic"} and epic["epic"]["enabled"]
    for name in ("xvlm_4m", "xvlm_shapes_tiny"):
        model = dict(read(name)["model"])
        model.pop("family")
        model["vocab_size"] = model["vocab_size"] or 2000
        model.update(vision_pretrained=None, text_pretrained=None)
        with torch.device("meta"):
            XVLM(XVLMConfig(**model))


def test_region_loader_resumes_exactly(shapes_world):
    from epic.data.region_loader import build_region_loader
    from epic.data.synthetic import shard_spec

    def loader(state=None):
        return build_region_loader(shard_spec(shapes_world, "train"), shapes_world / "tokenizer", image_size=64, grid=8,
                                   max_text_len=24, batch_size=8, max_images=3, max_regions=3, hflip=False, seed=5,
                                   state=state)

    def take(it, n):
        return [next(it) for _ in range(n)]

    full = take(iter(loader()), 5)
    first = loader()
    it = iter(first)
    take(it, 2)
    resumed = take(iter(loader(first.state_dict())), 3)
    for a, b in zip(full[2:], resumed):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    batch = full[0]
    assert batch["image_atts"].shape == (8, 65) and batch["pixel_values"].shape[0] <= 3
    assert not torch.equal(full[0]["input_ids"], full[1]["input_ids"])


def test_region_batches_are_normalised_as_data_normalization(shapes_world):
    """The region loader normalises with data.normalization like the caption loader: the same region crop (same
    seed) under clip and inception statistics is the same raw image; an unknown name fails when the loader is
    built; the wiring passes the run's data.normalization to it."""
    from epic.config import load_config
    from epic.data.region_loader import build_region_loader
    from epic.data.synthetic import shard_spec
    from epic.data.transforms import CLIP_MEAN, CLIP_STD
    from epic.wiring import resolve_data_paths, with_region_steps

    def first_pixels(**kw):
        loader = build_region_loader(shard_spec(shapes_world, "train"), shapes_world / "tokenizer", image_size=64,
                                     grid=8, max_text_len=24, batch_size=4, max_images=2, hflip=False, seed=3, **kw)
        return next(iter(loader))["pixel_values"]

    clip, inception = first_pixels(), first_pixels(normalization="inception")
    raw_clip = clip * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
    torch.testing.assert_close(inception * 0.5 + 0.5, raw_clip, atol=1e-5, rtol=0)
    assert float((clip - inception).abs().max()) > 0.1 and float(inception.min()) >= -1 - 1e-6
    with pytest.raises(ValueError, match="data.normalization"):
        first_pixels(normalization="pixelbert")

    cfg = load_config("xvlm_shapes_tiny", [f"data.root={shapes_world}", "data.normalization=inception",
                                           "data.image_size=64", "model.image_size=64"])
    model = XVLM(XVLMConfig.tiny(vocab_size=2000, pad_token_id=1))
    objective = with_region_steps(cfg, None, model, shapes_world / "tokenizer", resolve_data_paths(cfg), 0, 1)
    assert objective.region_loader._stream_args["normalization"] == "inception"


def test_objective_interleaves_and_counts_flops(shapes_world):
    from epic.data.region_loader import build_region_loader
    from epic.data.synthetic import shard_spec
    from epic.objectives.xvlm import XVLMObjective, step_flops_per_sample

    cfg = XVLMConfig.tiny(vocab_size=2000, pad_token_id=1)
    loader = build_region_loader(shard_spec(shapes_world, "train"), shapes_world / "tokenizer", image_size=64,
                                 grid=cfg.image_grid, max_text_len=16, batch_size=4, max_images=2, hflip=False)
    objective = XVLMObjective(loader, iter_perc=0.5)
    torch.manual_seed(0)
    model = XVLM(cfg)
    pixel_values, input_ids, atts = batch(4, B=4, L=16)
    input_ids = input_ids.clamp(max=1999)
    mlm_ids, mlm_labels = mask_batch(input_ids, atts == 0, random.Random(0), 4, 2000)
    caption = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": atts,
               "mlm_input_ids": mlm_ids, "mlm_labels": mlm_labels}
    outs = [objective.losses(model, caption, torch.Generator().manual_seed(s), s) for s in range(4)]
    assert [float(out["region_step"]) for out in outs] == [0.0, 1.0, 0.0, 1.0]
    assert "bbox_giou" in outs[3] and "bbox_giou" not in outs[2]
    state = json.loads(json.dumps(objective.state_dict()))
    assert state["region_loader"]["batches"] == 2
    caption_only = step_flops_per_sample(cfg, 16, 0.0, model_cls=XVLM)
    mixed = step_flops_per_sample(cfg, 16, 0.5, model_cls=XVLM)
    assert 0 < caption_only < mixed  # region steps add the whole-image fusion for the box head


def test_epic_generator_builds_from_the_x_vlm_config():
    """EPIC-X-VLM's generator is a BERT masked LM sized from X-VLM's text tower (epic.models.generator)."""
    from epic.config import GeneratorConfig
    from epic.models.generator import build_generator

    cfg = XVLMConfig.tiny()
    generator = build_generator(GeneratorConfig(layers=2), cfg)
    assert type(generator.lm).__name__ == "BertForMaskedLM"
    hf = generator.lm.config
    assert (hf.vocab_size, hf.hidden_size, hf.num_hidden_layers, hf.pad_token_id) == (cfg.vocab_size, cfg.hidden_size,
                                                                                      2, cfg.pad_token_id)


def test_contrastive_gathers_across_ranks_like_x_vlm(tmp_path):
    """2 gloo ranks: each computes the loss over the gathered batch (= the single-process loss over all rows); the
    gradient reaching each rank's features is its slice of that loss's gradient (X-VLM's AllGather backward)."""
    import torch.multiprocessing as mp

    port = free_port()
    from _xvlm_gather_worker import gather_worker  # small module: the ranks import no model code

    mp.spawn(gather_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    image = F.normalize(torch.randn(4, 8), dim=-1).requires_grad_(True)
    text = F.normalize(torch.randn(4, 8), dim=-1)
    full = contrastive_loss(image, text, torch.tensor(0.07))
    full.backward()
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(saved["loss"], full.detach(), atol=1e-6)
        assert torch.allclose(saved["grad"], image.grad[2 * rank:2 * rank + 2], atol=1e-6)


def test_towers_load_from_local_swin_and_bert_checkpoints(tmp_path):
    """vision_pretrained: a Microsoft Swin checkpoint ({'model': ...}, merging at the end of a stage, with its
    classifier); text_pretrained: an HF BERT folder. Everything but the cross-attention comes from them."""
    from transformers import BertConfig, BertForMaskedLM

    swin, state = official_swin(3)
    swin_state = {k[len("vision_encoder."):]: v for k, v in state.items()}
    swin_state["head.weight"], swin_state["head.bias"] = torch.zeros(10, 64), torch.zeros(10)
    torch.save({"model": swin_state}, tmp_path / "swin.pth")
    t = OFFICIAL_CONFIG["text_config"]
    torch.manual_seed(3)
    bert = BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=40))
    bert.save_pretrained(tmp_path / "bert")
    v = OFFICIAL_CONFIG["vision_config"]
    cfg = XVLMConfig(image_size=64, swin_window_size=v["window_size"], swin_embed_dim=v["embed_dim"],
                     swin_depths=v["depths"], swin_num_heads=v["num_heads"], swin_drop_path_rate=0.0, vocab_size=100,
                     hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=40, max_text_len=32, fusion_layer=t["fusion_layer"], embed_dim=16,
                     vision_pretrained=str(tmp_path / "swin.pth"), text_pretrained=str(tmp_path / "bert"))
    model = XVLM(cfg).eval()
    for key, value in swin.state_dict().items():
        assert torch.equal(model.vision_encoder.state_dict()[key], value), key
    ours = model.text_encoder.state_dict()
    shared = set(bert.state_dict()) & set(ours)
    assert len(shared) == len(ours) - sum(".crossattention." in k for k in ours)  # all but the cross-attention
    for key, value in bert.state_dict().items():
        if key in ours:
            assert torch.equal(ours[key], value), key
    assert model.text_encoder.cls.predictions.decoder.weight is model.text_encoder.bert.embeddings.word_embeddings.weight
    with pytest.raises(FileNotFoundError, match="vision_pretrained"):
        XVLM(dataclasses.replace(cfg, vision_pretrained=str(tmp_path / "nope.pth")))


@torch.no_grad()
def test_zero_shot_retrieval_uses_the_contrastive_shortlist(shapes_world):
    """epic.eval.retrieval with X-VLM: the first stage is X-VLM's contrastive features (retrieval_embeddings), the
    re-ranking the ITM match logit; a shortlist covering every candidate gives the exhaustive result."""
    from epic.data import build_eval_loader
    from epic.data.synthetic import shard_spec
    from epic.eval.retrieval import encode_eval_set, first_stage_embeddings, retrieval_scores

    torch.manual_seed(0)
    model = XVLM(XVLMConfig.tiny(vocab_size=2000, pad_token_id=1)).eval()
    loader = build_eval_loader(shard_spec(shapes_world, "val"), shapes_world / "tokenizer", image_size=64,
                               max_text_len=24, batch_size=32)
    data = encode_eval_set(model, loader, max_images=6)
    image_vec, text_vec = first_stage_embeddings(model, data)
    assert torch.allclose(image_vec, model.image_features(data.image_embeds), atol=1e-6)
    assert torch.allclose(text_vec, model.text_features(data.text_embeds), atol=1e-6)
    exhaustive = retrieval_scores(model, data, k_test=0)
    assert torch.equal(retrieval_scores(model, data, k_test=data.text_embeds.shape[0]), exhaustive)
    shortlisted = retrieval_scores(model, data, k_test=2)
    kept = torch.isfinite(shortlisted)
    assert 0 < kept.sum() < kept.numel() and torch.equal(shortlisted[kept], exhaustive[kept])


def test_shapes_box_tool_runs(shapes_world):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "xvlm_shapes_box.py"
    spec = importlib.util.spec_from_file_location("xvlm_shapes_box", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    history = tool.run(shapes_world, steps=2, eval_every=2, seed=0, log=lambda line: None)
    assert [h["step"] for h in history] == [0, 2]
    assert all(0.0 <= h["box_accuracy"] <= 1.0 and 0.0 <= h["mean_iou"] <= 1.0 for h in history)
    assert "train_bbox_giou" in history[-1]  # step 1 was a region step


def test_vanilla_step_and_flop_count_use_the_x_vlm_recipe():
    """Registered in epic.objectives.recipes: the trainer's vanilla objective (and EPIC's base losses) run X-VLM's
    caption losses; its FLOP count runs them on the meta device."""
    from epic.config import load_config
    from epic.objectives.vanilla import VanillaObjective, vanilla_losses

    torch.manual_seed(0)
    model = XVLM(XVLMConfig.tiny(vocab_size=100))
    pixel_values, input_ids, atts = batch(5, B=4)
    mlm_ids, mlm_labels = mask_batch(input_ids, atts == 0, random.Random(0), 4, 100)
    out = vanilla_losses(model, {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": atts,
                                 "mlm_input_ids": mlm_ids, "mlm_labels": mlm_labels}, torch.Generator().manual_seed(0))
    assert {"loss", "contrastive", "itm", "mlm"} <= set(out) and torch.isfinite(out["loss"])
    cfg = load_config("xvlm_shapes_tiny", ["model.vocab_size=100"])
    assert VanillaObjective().flops_per_sample(cfg) > 0
