"""ViLT: forward against an independent reference over the official key names, the official-key round trip,
seeded patch sampling, and the family-interface methods.

The reference (``reference_infer``) is written from the paper and the structure of dandelin/ViLT
(``vilt_module.infer``, ``vision_transformer.visual_embed`` / ``Block`` / ``Attention``, ``heads``), with plain
torch ops over a state dict that carries every key of an official ``vilt_200k_mlm_itm.ckpt``; it shares no code
with ``epic.models.vilt``.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from epic.models.interface import INFER_KEYS, VLPModel
from epic.models.vilt import ViLT, ViLTConfig, load_official_vilt, sample_patches, to_official_state_dict
from epic.models.vilt.convert_vilt import vilt_config_from_official

# ViLT's own config.py keys for a tiny model (what load_official_vilt receives)
TINY = dict(hidden_size=32, num_heads=4, num_layers=3, mlp_ratio=2, patch_size=8, image_size=32, max_text_len=9,
            vocab_size=61, max_image_len=200, drop_rate=0.1, vit="vit_base_patch32_384", tokenizer="bert-base-uncased",
            loss_names={"itm": 1, "mlm": 1}, learning_rate=1e-4)
GRID = 4  # image_size / patch_size of the synthetic checkpoint


def official_shapes(hidden=32, layers=3, mlp=64, patch=8, grid=GRID, text_len=9, vocab=61, types=2):
    """Every tensor of an official ViLT MLM+ITM checkpoint (state_dict keys), by ViLT's module structure."""
    shapes = {
        "text_embeddings.position_ids": (1, text_len),
        "text_embeddings.word_embeddings.weight": (vocab, hidden),
        "text_embeddings.position_embeddings.weight": (text_len, hidden),
        "text_embeddings.token_type_embeddings.weight": (2, hidden),
        "text_embeddings.LayerNorm.weight": (hidden,), "text_embeddings.LayerNorm.bias": (hidden,),
        "token_type_embeddings.weight": (types, hidden),
        "transformer.cls_token": (1, 1, hidden),
        "transformer.pos_embed": (1, grid * grid + 1, hidden),
        "transformer.patch_embed.proj.weight": (hidden, 3, patch, patch),
        "transformer.patch_embed.proj.bias": (hidden,),
        "transformer.norm.weight": (hidden,), "transformer.norm.bias": (hidden,),
        "pooler.dense.weight": (hidden, hidden), "pooler.dense.bias": (hidden,),
        "mlm_score.bias": (vocab,),
        "mlm_score.transform.dense.weight": (hidden, hidden), "mlm_score.transform.dense.bias": (hidden,),
        "mlm_score.transform.LayerNorm.weight": (hidden,), "mlm_score.transform.LayerNorm.bias": (hidden,),
        "mlm_score.decoder.weight": (vocab, hidden),
        "itm_score.fc.weight": (2, hidden), "itm_score.fc.bias": (2,),
    }
    for i in range(layers):
        p = f"transformer.blocks.{i}."
        shapes.update({p + "norm1.weight": (hidden,), p + "norm1.bias": (hidden,),
                       p + "attn.qkv.weight": (3 * hidden, hidden), p + "attn.qkv.bias": (3 * hidden,),
                       p + "attn.proj.weight": (hidden, hidden), p + "attn.proj.bias": (hidden,),
                       p + "norm2.weight": (hidden,), p + "norm2.bias": (hidden,),
                       p + "mlp.fc1.weight": (mlp, hidden), p + "mlp.fc1.bias": (mlp,),
                       p + "mlp.fc2.weight": (hidden, mlp), p + "mlp.fc2.bias": (hidden,)})
    return shapes


def synthetic_checkpoint(seed=0, **sizes):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in official_shapes(**sizes).items():
        if key.endswith("position_ids"):
            state[key] = torch.arange(shape[1]).unsqueeze(0)
        elif "LayerNorm.weight" in key or key.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            state[key] = 1.0 + 0.2 * torch.randn(shape, generator=g)
        else:
            fan_in = shape[-1] if len(shape) == 2 and "embeddings" not in key else 1
            scale = 0.3 if fan_in == 1 else 1.0 / math.sqrt(fan_in)
            if key.endswith("patch_embed.proj.weight"):
                scale = 1.0 / math.sqrt(3 * shape[-1] ** 2)
            state[key] = scale * torch.randn(shape, generator=g)
    return state


def _ln(x, sd, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def _linear(x, sd, prefix):
    return x @ sd[prefix + ".weight"].T + sd[prefix + ".bias"]


def reference_infer(sd, heads, input_ids, attention_mask, pixel_values, patch_index=None, image_type=1,
                    saliency_layer=None):
    """Official ViLT infer (all patches, no masking), plain ops. ``patch_index`` [B, K] restricts the patches
    (pretraining's sampled subset); ``saliency_layer`` returns that layer's (image-CLS query, text keys)."""
    length = input_ids.shape[1]
    # text: BertEmbeddings (word + position + BERT type 0, LayerNorm 1e-12) + ViLT modality type 0
    text = (sd["text_embeddings.word_embeddings.weight"][input_ids]
            + sd["text_embeddings.position_embeddings.weight"][:length]
            + sd["text_embeddings.token_type_embeddings.weight"][0])
    text = _ln(text, sd, "text_embeddings.LayerNorm", 1e-12) + sd["token_type_embeddings.weight"][0]
    # image: conv patches + position embeddings interpolated to the grid (bilinear, align_corners) + [CLS]
    weight = sd["transformer.patch_embed.proj.weight"]
    patches = F.conv2d(pixel_values, weight, sd["transformer.patch_embed.proj.bias"], stride=weight.shape[-1])
    batch, hidden, h, w = patches.shape
    pos = sd["transformer.pos_embed"]
    grid = int(round((pos.shape[1] - 1) ** 0.5))
    spatial = pos[:, 1:].transpose(1, 2).reshape(1, hidden, grid, grid)
    spatial = F.interpolate(spatial, size=(h, w), mode="bilinear", align_corners=True)
    tokens = patches.flatten(2).transpose(1, 2) + spatial.flatten(2).transpose(1, 2)
    if patch_index is not None:
        tokens = torch.stack([tokens[b, patch_index[b]] for b in range(batch)])
    cls = (sd["transformer.cls_token"] + pos[:, :1]).expand(batch, -1, -1)
    image = torch.cat([cls, tokens], 1) + sd["token_type_embeddings.weight"][image_type]
    x = torch.cat([text, image], 1)
    keep = torch.cat([attention_mask.bool(), torch.ones(batch, image.shape[1], dtype=torch.bool)], 1)
    dh = hidden // heads
    for i in range(len({k.split(".")[2] for k in sd if k.startswith("transformer.blocks.")})):
        p = f"transformer.blocks.{i}."
        y = _ln(x, sd, p + "norm1", 1e-6)
        q, k, v = _linear(y, sd, p + "attn.qkv").reshape(batch, x.shape[1], 3, heads, dh).permute(2, 0, 3, 1, 4)
        if i == saliency_layer:
            return q[:, :, length], k[:, :, :length]
        scores = (q @ k.transpose(-2, -1)) * dh ** -0.5
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, x.shape[1], hidden)
        x = x + _linear(out, sd, p + "attn.proj")
        y = _ln(x, sd, p + "norm2", 1e-6)
        x = x + _linear(F.gelu(_linear(y, sd, p + "mlp.fc1")), sd, p + "mlp.fc2")
    x = _ln(x, sd, "transformer.norm", 1e-6)
    text_feats, image_feats = x[:, :length], x[:, length:]
    cls_feats = torch.tanh(_linear(x[:, 0], sd, "pooler.dense"))
    mlm = _ln(F.gelu(_linear(text_feats, sd, "mlm_score.transform.dense")), sd, "mlm_score.transform.LayerNorm",
              1e-12)
    mlm = mlm @ sd["mlm_score.decoder.weight"].T + sd["mlm_score.bias"]
    return {"text_feats": text_feats, "image_feats": image_feats, "cls_feats": cls_feats,
            "mlm_logits": mlm, "itm_logits": _linear(cls_feats, sd, "itm_score.fc")}


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def batch_inputs(seed=1, batch=3, length=9, image=32, vocab=61):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return ids, mask, torch.randn(batch, 3, image, image, generator=g)


def tiny_config(**overrides):
    values = dict(hidden_size=32, num_layers=3, num_heads=4, mlp_ratio=2, image_size=32, patch_size=8,
                  vocab_size=61, max_text_len=9, max_image_len=10, drop_rate=0.0)
    values.update(overrides)
    return ViLTConfig(**values)


# ------------------------------------------------------------------------------------------------ forward
def test_infer_equals_independent_reference_on_official_keys():
    sd = synthetic_checkpoint()
    model = load_official_vilt(sd, dict(TINY)).eval()
    ids, mask, pixels = batch_inputs()
    with torch.no_grad():
        ours = model.infer(ids, mask, pixels)
        ref = reference_infer(sd, 4, ids, mask, pixels)
        for key in ("text_feats", "image_feats", "cls_feats"):
            assert ours[key].shape == ref[key].shape
            assert rel_err(ours[key], ref[key]) < 1e-5, key
        assert rel_err(model.mlm_score(ours["text_feats"]), ref["mlm_logits"]) < 1e-5
        assert rel_err(model.itm_score(ours["cls_feats"]), ref["itm_logits"]) < 1e-5
        # a different image reaches the text states (the two modalities really attend to each other)
        other = model.infer(ids, mask, pixels.flip(0))
        assert rel_err(other["text_feats"], ours["text_feats"]) > 1e-3


def test_position_grid_is_interpolated_like_vilt():
    """A checkpoint trained on a 4x4 grid read at 48 px (6x6): ours resamples once, ViLT on the fly."""
    sd = synthetic_checkpoint(seed=3)
    model = load_official_vilt(sd, {**TINY, "image_size": 48}).eval()
    assert model.transformer.pos_embed.shape[1] == 37
    ids, mask, pixels = batch_inputs(image=48)
    with torch.no_grad():
        ours, ref = model.infer(ids, mask, pixels), reference_infer(sd, 4, ids, mask, pixels)
    assert rel_err(ours["cls_feats"], ref["cls_feats"]) < 1e-5
    # and an input grid that differs from the model's own is interpolated at run time (same operation)
    model32 = load_official_vilt(sd, dict(TINY)).eval()
    with torch.no_grad():
        assert rel_err(model32.infer(ids, mask, pixels)["text_feats"], ref["text_feats"]) < 1e-5


def test_nlvr2_second_image_type():
    sd = synthetic_checkpoint(seed=4, types=3)
    model = load_official_vilt(sd, dict(TINY)).eval()
    assert model.config.num_token_types == 3
    ids, mask, pixels = batch_inputs()
    with torch.no_grad():
        ours = model.infer(ids, mask, pixels, image_token_type_idx=2)
        assert rel_err(ours["cls_feats"], reference_infer(sd, 4, ids, mask, pixels, image_type=2)["cls_feats"]) < 1e-5
    with pytest.raises(ValueError, match="num_token_types=3"):
        load_official_vilt(synthetic_checkpoint(), dict(TINY)).infer(ids, mask, pixels, image_token_type_idx=2)


# ------------------------------------------------------------------------------------------ official keys
def test_official_round_trip_is_identical():
    model = ViLT(tiny_config(num_token_types=3))
    official = to_official_state_dict(model)
    assert set(official) == set(official_shapes(types=3))
    again = load_official_vilt(official, {"num_heads": 4, "max_image_len": 10, "drop_rate": 0.0})
    ours, back = model.state_dict(), again.state_dict()
    assert set(ours) == set(back)
    assert all(torch.equal(ours[k], back[k]) for k in ours)
    assert again.config == model.config


def test_missing_and_unknown_keys_are_listed():
    sd = synthetic_checkpoint()
    broken = {k: v for k, v in sd.items() if k != "transformer.blocks.1.attn.qkv.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['transformer.blocks.1.attn.qkv.bias'\]"):
        load_official_vilt(broken, dict(TINY))
    with pytest.raises(ValueError, match=r"unknown keys \['fusion.extra.weight'\]"):
        load_official_vilt({**sd, "fusion.extra.weight": torch.zeros(2)}, dict(TINY))
    no_heads = {k: v for k, v in sd.items() if not k.startswith(("mlm_score.", "itm_score."))}
    with pytest.raises(ValueError, match="allow_missing_heads=True"):
        load_official_vilt(no_heads, dict(TINY))
    assert isinstance(load_official_vilt(no_heads, dict(TINY), allow_missing_heads=True), ViLT)
    # heads of other ViLT objectives / tasks are skipped, not loaded
    load_official_vilt({**sd, "vqa_classifier.0.weight": torch.zeros(2, 2)}, dict(TINY))


def test_config_rules(tmp_path):
    sd = synthetic_checkpoint()
    inferred = vilt_config_from_official(sd)  # nothing given: every size from the tensors
    assert (inferred.hidden_size, inferred.num_layers, inferred.mlp_ratio, inferred.patch_size,
            inferred.image_size, inferred.max_text_len, inferred.vocab_size, inferred.num_heads) == (
        32, 3, 2, 8, 32, 9, 61, 1)  # num_heads: hidden // 64 unless ViLT's config gives it
    path = tmp_path / "vilt_config.json"
    path.write_text('{"num_heads": 4, "max_image_len": 200, "seed": 0}')
    assert vilt_config_from_official(sd, str(path)).num_heads == 4
    with pytest.raises(ValueError, match="hidden_size=768 but the tensors say 32"):
        vilt_config_from_official(sd, {"hidden_size": 768})
    with pytest.raises(ValueError, match=r"unknown ViLT config keys \['hiden_size'\]"):
        vilt_config_from_official(sd, {"hiden_size": 32})


# ------------------------------------------------------------------------------------------ patch sampling
def test_sample_patches_seeded_capped_raster():
    valid = torch.ones(4, 16, dtype=torch.bool)
    a = sample_patches(valid, 10, torch.Generator().manual_seed(7))
    b = sample_patches(valid, 10, torch.Generator().manual_seed(7))
    c = sample_patches(valid, 10, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert a[0].shape == (4, 10) and bool(a[1].all())
    for row in a[0]:
        assert torch.equal(row, row.unique())  # distinct, ascending = raster order
    assert sample_patches(valid, -1)[0].shape == (4, 16)  # -1: no cap


def test_sample_patches_valid_first_then_padding():
    """ViLT's rule for padded images: all valid patches (raster) then padding drawn with replacement."""
    valid = torch.zeros(2, 16, dtype=torch.bool)
    valid[0, [1, 5, 9]] = True
    valid[1, :12] = True
    index, kept = sample_patches(valid, 10, torch.Generator().manual_seed(0))
    assert index.shape == (2, 10)
    assert index[0, :3].tolist() == [1, 5, 9] and kept[0].tolist() == [True] * 3 + [False] * 7
    assert not valid[0, index[0, 3:]].any()
    assert bool(kept[1].all()) and bool(valid[1, index[1]].all()) and len(set(index[1].tolist())) == 10
    # K = the most valid patches of any image when that is under the cap
    assert sample_patches(valid, 200)[0].shape == (2, 12)


def test_model_samples_in_training_only_and_pairs_positions_with_patches():
    sd = synthetic_checkpoint(seed=5)
    model = load_official_vilt(sd, {**TINY, "max_image_len": 10, "drop_rate": 0.0})
    ids, mask, pixels = batch_inputs()
    model.eval()
    embedded = model.visual_embed(pixels, generator=torch.Generator().manual_seed(0))
    assert embedded.embeds.shape[1] == 17 and torch.equal(embedded.patch_index, torch.arange(16).expand(3, -1))
    model.train()
    first = model.visual_embed(pixels, generator=torch.Generator().manual_seed(0))
    again = model.visual_embed(pixels, generator=torch.Generator().manual_seed(0))
    other = model.visual_embed(pixels, generator=torch.Generator().manual_seed(1))
    assert first.embeds.shape[1] == 11 and torch.equal(first.patch_index, again.patch_index)
    assert not torch.equal(first.patch_index, other.patch_index)
    with torch.no_grad():
        out = model.infer(ids, mask, pixels, generator=torch.Generator().manual_seed(0))
        ref = reference_infer(sd, 4, ids, mask, pixels, patch_index=first.patch_index)
    assert rel_err(out["cls_feats"], ref["cls_feats"]) < 1e-5
    # a grid within the cap is used whole in training too (ViLT-B/32 at 384 px: 144 <= 200 patches)
    roomy = ViLT(tiny_config(max_image_len=200)).train()
    assert roomy.visual_embed(pixels).embeds.shape[1] == 17


# --------------------------------------------------------------------------------------------- interface
def test_interface_methods_and_shapes():
    model = ViLT(tiny_config(consistency_head=True)).eval()
    assert isinstance(model, VLPModel) and model.family == "vilt"
    ids, mask, pixels = batch_inputs()
    image_embeds = model.encode_image(pixels)
    assert image_embeds.shape == (3, 17, 32)
    out = model.infer(ids, mask, image_embeds=image_embeds)
    assert set(INFER_KEYS) <= set(out)
    assert out["text_feats"].shape == (3, 9, 32) and out["image_feats"].shape == (3, 17, 32)
    assert out["cls_feats"].shape == (3, 32)
    assert torch.allclose(out["cls_feats"], model.infer(ids, mask, pixel_values=pixels)["cls_feats"])
    assert model.itm_score(out["cls_feats"]).shape == (3, 2)
    logits = model.mlm_score(out["text_feats"])
    weight, bias = model.mlm_output_embedding()
    assert logits.shape == (3, 9, 61)
    assert torch.allclose(logits, model.mlm_transform(out["text_feats"]) @ weight.T + bias, atol=1e-6)
    head = model.consistency_head()
    assert head.in_features == 32 and head.out_features == 1
    assert ViLT(tiny_config()).consistency_head() is None


def test_saliency_qk_matches_reference_and_teacher():
    sd = synthetic_checkpoint(seed=6)
    model = load_official_vilt(sd, dict(TINY)).eval()
    ids, mask, pixels = batch_inputs()
    with torch.no_grad():
        query, keys = model.saliency_qk(ids, mask, pixels)
        ref_q, ref_k = reference_infer(sd, 4, ids, mask, pixels, saliency_layer=1)  # penultimate of 3
    assert query.shape == (3, 4, 8) and keys.shape == (3, 4, 9, 8)
    assert rel_err(query, ref_q) < 1e-5 and rel_err(keys, ref_k) < 1e-5
    teacher = model.saliency_teacher()
    assert not any(p.requires_grad for p in teacher.parameters())
    assert sum(p.numel() for p in teacher.parameters()) < sum(p.numel() for p in model.parameters())
    assert not hasattr(teacher, "pooler") and len(teacher.transformer.blocks) == 2
    teacher.train()
    assert not teacher.training
    t_q, t_k = teacher.saliency_qk(ids, mask, pixels)
    assert torch.equal(t_q, query) and torch.equal(t_k, keys)
    with pytest.raises(RuntimeError, match="saliency teacher"):
        teacher.infer(ids, mask, pixels)
    assert model.pooler is not None  # the model itself is untouched


def test_param_groups_follow_vilt_rules():
    model = ViLT(tiny_config(consistency_head=True))
    spec = model.param_groups_spec()
    listed = [n for group in spec.values() for names in group.values() for n in names]
    assert sorted(listed) == sorted(n for n, _ in model.named_parameters()) and len(listed) == len(set(listed))
    no_decay = {n for group in spec.values() for n in group["no_decay"]}
    assert "transformer.blocks.0.norm1.weight" in no_decay and "mlm_score.bias" in no_decay
    assert "text_embeddings.LayerNorm.weight" in no_decay and "transformer.norm.bias" in no_decay
    assert "transformer.pos_embed" in spec["backbone"]["decay"]  # ViLT decays positions and [CLS]
    assert "transformer.blocks.2.attn.qkv.weight" in spec["fusion"]["decay"]
    assert set(spec["head"]["decay"]) == {"mlm_score.transform.dense.weight", "mlm_score.decoder.weight",
                                          "itm_score.fc.weight", "itc_score.weight"}
    model.transformer.blocks[0].requires_grad_(False)
    assert not any("blocks.0." in n for g in model.param_groups_spec().values() for v in g.values() for n in v)


def test_save_and_from_pretrained(tmp_path):
    model = ViLT(tiny_config(consistency_head=True)).eval()
    model.save_pretrained(str(tmp_path / "export"))
    again = ViLT.from_pretrained(str(tmp_path / "export")).eval()
    assert again.config == model.config and again.consistency_head() is not None
    ids, mask, pixels = batch_inputs()
    with torch.no_grad():
        assert torch.equal(model.infer(ids, mask, pixels)["text_feats"], again.infer(ids, mask, pixels)["text_feats"])
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        ViLT.from_pretrained(str(tmp_path))


def test_pretrained_vit_from_local_file(tmp_path):
    """ViLT starts from timm's vit_base_patch32_384; here a tiny timm ViT saved the way timm saves it."""
    from functools import partial

    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=4, mlp_ratio=2,
                            num_classes=10, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    model = ViLT(tiny_config(vit_pretrained=str(tmp_path / "vit.pth")))
    assert torch.equal(model.transformer.blocks[2].attn.qkv.weight, vit.blocks[2].attn.qkv.weight)  # 4th dropped
    assert torch.equal(model.transformer.pos_embed, vit.pos_embed)
    bigger = ViLT(tiny_config(vit_pretrained=str(tmp_path / "vit.pth"), image_size=48))
    assert bigger.transformer.pos_embed.shape == (1, 37, 32)
    with pytest.raises(ValueError, match="does not fit"):
        ViLT(tiny_config(vit_pretrained=str(tmp_path / "vit.pth"), hidden_size=64))
    with pytest.raises(FileNotFoundError, match="vit_base_patch32_384"):
        ViLT(tiny_config(vit_pretrained=str(tmp_path / "none.pth")))


# --------------------------------------------------------------------------------------------- downstream
def test_task_models():
    from epic.models.vilt.tasks_vilt import build_task_model

    config = tiny_config()
    ids, mask, pixels = batch_inputs()
    retrieval = build_task_model("retrieval", config).eval()
    assert torch.equal(retrieval.rank_output.weight, retrieval._modules["itm_score"].fc.weight[1:])
    assert not any(p.requires_grad for n, p in retrieval.named_parameters() if n.startswith(("itm_score", "mlm_score")))
    with torch.no_grad():
        cls_feats = retrieval.infer(ids, mask, pixels)["cls_feats"]
        match_logit = retrieval.itm_score(cls_feats)[:, 1]
    assert torch.allclose(retrieval.pair_score(cls_feats), match_logit)  # rank_output starts as ITM's match row
    vqa = build_task_model("vqa", config, num_answers=7)
    assert vqa(pixels, ids, mask).shape == (3, 7)
    with pytest.raises(ValueError, match="answer list"):
        build_task_model("vqa", config)
    nlvr2 = build_task_model("nlvr2", config).eval()
    assert nlvr2.config.num_token_types == 3
    nlvr2.copy_image_type_row()
    assert torch.equal(nlvr2.token_type_embeddings.weight[2], nlvr2.token_type_embeddings.weight[1])
    official = to_official_state_dict(nlvr2)
    with torch.no_grad():
        logits = nlvr2(pixels, pixels.flip(0), ids, mask)
        first = reference_infer(official, 4, ids, mask, pixels, image_type=1)["cls_feats"]
        second = reference_infer(official, 4, ids, mask, pixels.flip(0), image_type=2)["cls_feats"]
        assert torch.allclose(logits, nlvr2.nlvr2_classifier(torch.cat([first, second], -1)), atol=1e-5)
    assert build_task_model("snli_ve", config)(pixels, ids, mask).shape == (3, 3)


def test_consistency_head_leaves_other_weights_unchanged():
    torch.manual_seed(0)
    plain = ViLT(tiny_config())
    torch.manual_seed(0)
    with_head = ViLT(tiny_config(consistency_head=True))
    assert all(torch.equal(v, with_head.state_dict()[k]) for k, v in plain.state_dict().items())


def test_text_embeds_and_retrieval_embeddings_are_reusable():
    model = ViLT(tiny_config()).eval()
    ids, mask, pixels = batch_inputs()
    with torch.no_grad():
        text_embeds, image_embeds = model.encode_text(ids, mask), model.encode_image(pixels)
        reused = model.infer(ids, mask, image_embeds=image_embeds, text_embeds=text_embeds)
        torch.testing.assert_close(reused["cls_feats"], model.infer(ids, mask, pixels)["cls_feats"], rtol=0, atol=0)
        image_vec, text_vec = model.retrieval_embeddings(image_embeds, text_embeds, mask)
    assert image_vec.shape == text_vec.shape == (3, 32)
    torch.testing.assert_close(text_vec[2], text_embeds[2, :3].mean(0))


def test_retrieval_evaluator_runs_vilt(shapes_world):
    """The exhaustive (and shortlisted) retrieval evaluator scores ViLT pairs through the interface alone."""
    from epic.data.loader import build_eval_loader
    from epic.data.text import load_tokenizer
    from epic.data.synthetic import shard_spec
    from epic.eval.retrieval import evaluate_retrieval

    tokenizer = load_tokenizer(shapes_world / "tokenizer")
    model = ViLT(tiny_config(image_size=64, vocab_size=len(tokenizer), max_text_len=32,
                             pad_token_id=tokenizer.pad_token_id))
    loader = build_eval_loader(shard_spec(shapes_world, "val"), tokenizer, image_size=64, max_text_len=32,
                               batch_size=32)
    for k_test in (0, 4):
        metrics = evaluate_retrieval(model, loader, k_test=k_test, max_images=12, batch_size=32)
        assert 0.0 <= metrics["tr_r1"] <= 100.0 and 0.0 <= metrics["ir_r10"] <= 100.0, metrics
    assert model.training  # the evaluator restores the mode


def test_lightning_checkpoint_file_with_its_hyper_parameters(tmp_path):
    """A .ckpt as ViLT writes it: state_dict + hyper_parameters.config (used when no config is given)."""
    from epic.models.vilt.convert_vilt import official_vilt_config

    sd = synthetic_checkpoint()
    path = tmp_path / "vilt_200k_mlm_itm.ckpt"
    torch.save({"state_dict": sd, "hyper_parameters": {"config": dict(TINY)}, "epoch": 3}, path)
    assert official_vilt_config(str(path)).num_heads == 4
    model = load_official_vilt(str(path)).eval()
    ids, mask, pixels = batch_inputs()
    with torch.no_grad():
        assert rel_err(model.infer(ids, mask, pixels)["cls_feats"], reference_infer(sd, 4, ids, mask, pixels)[
            "cls_feats"]) < 1e-5
