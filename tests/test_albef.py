"""ALBEF: the model against an independent forward written from the official code's structure (salesforce/ALBEF
models/{vit,xbert,model_pretrain}.py) on a synthetic checkpoint with every official key; the official-key round
trip; the contrastive loss with momentum distillation, the MLM distillation and the queue against hand
computations; the multinomial guard on bad rows; the momentum update; what is (not) trainable."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from epic.models.albef import ALBEF, ALBEFConfig, load_official_albef, to_official_state_dict
from epic.objectives.albef_losses import (albef_losses, hard_negative_weights, itm_pairs, mlm_distillation_loss,
                                          sample_hard_negatives)
from epic.objectives.contrastive import (alpha_ramp, contrastive_loss, dequeue_and_enqueue, enqueue,
                                         gather_features)

# ----------------------------------------------------------------------------------------------------------------
# A synthetic official checkpoint: every key of ALBEF's model_pretrain.ALBEF state dict, tiny sizes.
# ----------------------------------------------------------------------------------------------------------------
IMAGE, PATCH, VW, VDEPTH, VHEADS = 32, 8, 32, 2, 2
HIDDEN, LAYERS, FUSION, HEADS, FFN, VOCAB, MAXPOS, EMBED, QUEUE = 32, 4, 2, 2, 64, 64, 40, 16, 32

BERT_CONFIG = {"architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.0, "hidden_act": "gelu",
               "hidden_dropout_prob": 0.0, "hidden_size": HIDDEN, "initializer_range": 0.02,
               "intermediate_size": FFN, "layer_norm_eps": 1e-12, "max_position_embeddings": MAXPOS,
               "model_type": "bert", "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "pad_token_id": 0,
               "type_vocab_size": 2, "vocab_size": VOCAB, "fusion_layer": FUSION, "encoder_width": VW}
OFFICIAL_CONFIG = {"train_file": ["data/coco.json"], "bert_config": BERT_CONFIG, "image_res": IMAGE,
                   "vision_width": VW, "embed_dim": EMBED, "batch_size": 64, "temp": 0.07, "mlm_probability": 0.15,
                   "queue_size": QUEUE, "momentum": 0.995, "alpha": 0.4,
                   "optimizer": {"opt": "adamW", "lr": 1e-4, "weight_decay": 0.02}}
OVERRIDES = {"vision_heads": VHEADS}  # ALBEF hard-codes 12 ViT heads; the tiny ViT has 2


def official_shapes() -> dict:
    shapes = {}

    def linear(name, out_dim, in_dim):
        shapes[name + ".weight"] = (out_dim, in_dim)
        shapes[name + ".bias"] = (out_dim,)

    def norm(name, dim):
        shapes[name + ".weight"] = ("ln", dim)
        shapes[name + ".bias"] = (dim,)

    for vis in ("visual_encoder", "visual_encoder_m"):
        shapes[f"{vis}.cls_token"] = (1, 1, VW)
        shapes[f"{vis}.pos_embed"] = (1, 1 + (IMAGE // PATCH) ** 2, VW)
        shapes[f"{vis}.patch_embed.proj.weight"] = (VW, 3, PATCH, PATCH)
        shapes[f"{vis}.patch_embed.proj.bias"] = (VW,)
        for b in range(VDEPTH):
            p = f"{vis}.blocks.{b}."
            norm(p + "norm1", VW)
            linear(p + "attn.qkv", 3 * VW, VW)
            linear(p + "attn.proj", VW, VW)
            norm(p + "norm2", VW)
            linear(p + "mlp.fc1", 4 * VW, VW)
            linear(p + "mlp.fc2", VW, 4 * VW)
        norm(f"{vis}.norm", VW)
    for txt in ("text_encoder", "text_encoder_m"):
        e = f"{txt}.bert.embeddings."
        shapes[e + "word_embeddings.weight"] = (VOCAB, HIDDEN)
        shapes[e + "position_embeddings.weight"] = (MAXPOS, HIDDEN)
        shapes[e + "token_type_embeddings.weight"] = (2, HIDDEN)
        shapes[e + "position_ids"] = ("positions",)
        norm(e + "LayerNorm", HIDDEN)
        for i in range(LAYERS):
            p = f"{txt}.bert.encoder.layer.{i}."
            for attn in ("attention",) + (("crossattention",) if i >= FUSION else ()):
                for proj in ("query", "key", "value"):
                    linear(p + f"{attn}.self.{proj}", HIDDEN, HIDDEN if attn == "attention" else VW)
                linear(p + f"{attn}.output.dense", HIDDEN, HIDDEN)
                norm(p + f"{attn}.output.LayerNorm", HIDDEN)
            linear(p + "intermediate.dense", FFN, HIDDEN)
            linear(p + "output.dense", HIDDEN, FFN)
            norm(p + "output.LayerNorm", HIDDEN)
        c = f"{txt}.cls.predictions."
        shapes[c + "bias"] = (VOCAB,)
        linear(c + "transform.dense", HIDDEN, HIDDEN)
        norm(c + "transform.LayerNorm", HIDDEN)
        shapes[c + "decoder.weight"] = ("tied", e + "word_embeddings.weight")
        shapes[c + "decoder.bias"] = ("tied", c + "bias")
    for suffix in ("", "_m"):
        linear("vision_proj" + suffix, EMBED, VW)
        linear("text_proj" + suffix, EMBED, HIDDEN)
    linear("itm_head", 2, HIDDEN)
    shapes["temp"] = ()
    shapes["image_queue"] = ("queue",)
    shapes["text_queue"] = ("queue",)
    shapes["queue_ptr"] = ("ptr",)
    return shapes


def synthetic_official_state_dict(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    shapes = official_shapes()
    for key, shape in shapes.items():
        if shape == ():
            sd[key] = torch.tensor(0.07)
        elif shape[0] == "ln":
            sd[key] = 1.0 + 0.1 * torch.randn(shape[1], generator=g)
        elif shape[0] == "positions":
            sd[key] = torch.arange(MAXPOS).expand(1, -1)
        elif shape[0] == "queue":
            sd[key] = F.normalize(torch.randn(EMBED, QUEUE, generator=g), dim=0)
        elif shape[0] == "ptr":
            sd[key] = torch.tensor([8])
        elif shape[0] == "tied":
            continue
        else:
            sd[key] = 0.3 * torch.randn(*shape, generator=g)
    for key, shape in shapes.items():
        if shape and shape[0] == "tied":
            sd[key] = sd[shape[1]]
    return sd


# ----------------------------------------------------------------------------------------------------------------
# The independent forward: straight from the official structure, reading the raw official tensors.
# ----------------------------------------------------------------------------------------------------------------
def lin(sd, name, x):
    return x @ sd[name + ".weight"].t() + sd[name + ".bias"]


def ln(sd, name, x, eps):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)


def ref_vit(sd, p, image):
    """ALBEF models/vit.py VisionTransformer.forward."""
    x = F.conv2d(image, sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
    x = x + sd[p + "pos_embed"][:, :x.shape[1]]
    b, n, c = x.shape
    for i in range(VDEPTH):
        q = f"{p}blocks.{i}."
        h = ln(sd, q + "norm1", x, 1e-6)
        qkv = lin(sd, q + "attn.qkv", h).reshape(b, n, 3, VHEADS, c // VHEADS).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] @ qkv[1].transpose(-2, -1)) * (c // VHEADS) ** -0.5
        h = (attn.softmax(-1) @ qkv[2]).transpose(1, 2).reshape(b, n, c)
        x = x + lin(sd, q + "attn.proj", h)
        x = x + lin(sd, q + "mlp.fc2", F.gelu(lin(sd, q + "mlp.fc1", ln(sd, q + "norm2", x, 1e-6))))
    return ln(sd, p + "norm", x, 1e-6)


def extended(mask):
    """xbert get_extended_attention_mask / invert_attention_mask: (1 - mask) * -10000."""
    return (1.0 - mask[:, None, None, :].float()) * -10000.0


def ref_self_attention(sd, p, hidden, context, mask):
    def heads(x):
        return x.view(x.shape[0], x.shape[1], HEADS, HIDDEN // HEADS).permute(0, 2, 1, 3)

    q, k, v = (heads(lin(sd, p + name, src)) for name, src in (("query", hidden), ("key", context),
                                                               ("value", context)))
    scores = q @ k.transpose(-1, -2) / math.sqrt(HIDDEN // HEADS) + mask
    ctx = scores.softmax(-1) @ v
    return ctx.permute(0, 2, 1, 3).reshape(hidden.shape[0], hidden.shape[1], HIDDEN)


def ref_bert_layer(sd, p, i, hidden, mask, image, image_mask):
    """xbert BertLayer.forward: self-attention, cross-attention for layer_num >= fusion_layer, FFN."""
    a = ln(sd, p + "attention.output.LayerNorm",
           lin(sd, p + "attention.output.dense", ref_self_attention(sd, p + "attention.self.", hidden, hidden, mask))
           + hidden, 1e-12)
    if i >= FUSION:
        c = ref_self_attention(sd, p + "crossattention.self.", a, image, image_mask)
        a = ln(sd, p + "crossattention.output.LayerNorm", lin(sd, p + "crossattention.output.dense", c) + a, 1e-12)
    h = F.gelu(lin(sd, p + "intermediate.dense", a))
    return ln(sd, p + "output.LayerNorm", lin(sd, p + "output.dense", h) + a, 1e-12)


def ref_bert(sd, t, mode, attention_mask, input_ids=None, encoder_embeds=None, image=None):
    """xbert BertModel.forward with mode 'text' / 'fusion' / 'multi_modal'."""
    e = f"{t}.bert.embeddings."
    if encoder_embeds is None:
        length = input_ids.shape[1]
        x = (sd[e + "word_embeddings.weight"][input_ids] + sd[e + "token_type_embeddings.weight"][0]
             + sd[e + "position_embeddings.weight"][sd[e + "position_ids"][0, :length]])
        x = ln(sd, e + "LayerNorm", x, 1e-12)
    else:
        x = encoder_embeds
    start, stop = {"text": (0, FUSION), "fusion": (FUSION, LAYERS), "multi_modal": (0, LAYERS)}[mode]
    mask = extended(attention_mask)
    image_mask = None if image is None else extended(torch.ones(image.shape[:2]))
    for i in range(start, stop):
        x = ref_bert_layer(sd, f"{t}.bert.encoder.layer.{i}.", i, x, mask, image, image_mask)
    return x


def ref_mlm_logits(sd, t, x):
    c = f"{t}.cls.predictions."
    h = ln(sd, c + "transform.LayerNorm", F.gelu(lin(sd, c + "transform.dense", x)), 1e-12)
    return h @ sd[c + "decoder.weight"].t() + sd[c + "decoder.bias"]


def ref_albef(sd, image, input_ids, attention_mask):
    """model_pretrain.ALBEF.forward's feature path (image, text, fusion, heads)."""
    image_embeds = ref_vit(sd, "visual_encoder.", image)
    text_embeds = ref_bert(sd, "text_encoder", "text", attention_mask, input_ids=input_ids)
    fused = ref_bert(sd, "text_encoder", "fusion", attention_mask, encoder_embeds=text_embeds, image=image_embeds)
    multi = ref_bert(sd, "text_encoder", "multi_modal", attention_mask, input_ids=input_ids, image=image_embeds)
    image_embeds_m = ref_vit(sd, "visual_encoder_m.", image)
    text_embeds_m = ref_bert(sd, "text_encoder_m", "text", attention_mask, input_ids=input_ids)
    multi_m = ref_bert(sd, "text_encoder_m", "multi_modal", attention_mask, input_ids=input_ids, image=image_embeds_m)
    return {
        "image_embeds": image_embeds, "text_embeds": text_embeds, "text_feats": fused, "cls_feats": fused[:, 0],
        "image_feat": F.normalize(lin(sd, "vision_proj", image_embeds[:, 0]), dim=-1),
        "text_feat": F.normalize(lin(sd, "text_proj", text_embeds[:, 0]), dim=-1),
        "itm": lin(sd, "itm_head", fused[:, 0]), "mlm": ref_mlm_logits(sd, "text_encoder", multi),
        "image_feat_m": F.normalize(lin(sd, "vision_proj_m", image_embeds_m[:, 0]), dim=-1),
        "text_feat_m": F.normalize(lin(sd, "text_proj_m", text_embeds_m[:, 0]), dim=-1),
        "mlm_m": ref_mlm_logits(sd, "text_encoder_m", multi_m),
    }


def inputs(batch=3, length=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, IMAGE, IMAGE, generator=g)
    ids = torch.randint(5, VOCAB, (batch, length), generator=g)
    ids[:, 0] = 1
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 6:] = 0
    mask[1, 4:] = 0
    return image, ids, mask


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def official():
    sd = synthetic_official_state_dict()
    model = load_official_albef({"model": sd}, OFFICIAL_CONFIG, overrides=OVERRIDES).eval()
    return sd, model


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
def test_forward_matches_the_official_structure(official):
    sd, model = official
    image, ids, mask = inputs()
    ref = ref_albef(sd, image, ids, mask)
    with torch.no_grad():
        out = model.infer(pixel_values=image, input_ids=ids, attention_mask=mask)
        itm, mlm = model.itm_score(out["cls_feats"]), model.mlm_score(out["text_feats"])
        mom = model.momentum_features(ids, mask, image)
        mlm_m = model.momentum_mlm_logits(ids, mask, mom["image_embeds_m"])
    for key in ("image_embeds", "text_embeds", "image_feat", "text_feat", "text_feats", "cls_feats"):
        assert rel_err(out[key], ref[key]) < 1e-5, key
    from epic.models.interface import INFER_KEYS, VLPModel
    assert isinstance(model, VLPModel) and set(INFER_KEYS) <= set(out)
    assert torch.equal(out["image_feats"], out["image_embeds"])  # no fused image stream in ALBEF
    assert rel_err(itm, ref["itm"]) < 1e-5
    assert rel_err(mlm, ref["mlm"]) < 1e-5
    assert rel_err(mom["image_feat_m"], ref["image_feat_m"]) < 1e-5
    assert rel_err(mom["text_feat_m"], ref["text_feat_m"]) < 1e-5
    assert rel_err(mlm_m, ref["mlm_m"]) < 1e-5
    weight, bias = model.mlm_output_embedding()
    assert rel_err(model.mlm_transform(out["text_feats"]) @ weight.t() + bias, ref["mlm"]) < 1e-5
    # padding does not leak: changing padded ids leaves every real position unchanged
    ids2 = ids.clone()
    ids2[0, 6:] = 7
    with torch.no_grad():
        out2 = model.infer(pixel_values=image, input_ids=ids2, attention_mask=mask)
    assert rel_err(out2["text_feats"][0, :6], out["text_feats"][0, :6]) < 1e-5


def test_official_key_round_trip_and_save_pretrained(official, tmp_path):
    sd, model = official
    back = to_official_state_dict(model)
    assert set(back) == set(sd)
    for key, value in sd.items():
        assert torch.equal(back[key].to(value.dtype), value), key
    model.save_pretrained(str(tmp_path))
    again = ALBEF.from_pretrained(str(tmp_path))
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    assert again.text_encoder.cls.predictions.decoder.weight is again.text_encoder.bert.embeddings.word_embeddings.weight
    assert int(again.queue_ptr) == 8
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "model.safetensors"))  # without the tied aliases, strictly loadable
    assert not set(saved) & {"text_encoder.cls.predictions.decoder.weight", "text_encoder_m.cls.predictions.decoder.bias"}
    fresh = ALBEF(again.config)
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.text_encoder_m.cls.predictions.decoder.weight,
                       model.text_encoder_m.bert.embeddings.word_embeddings.weight)


def test_official_import_errors():
    sd = synthetic_official_state_dict()
    with pytest.raises(ValueError, match="unexpected keys.*'bogus.weight'"):
        load_official_albef({"model": {**sd, "bogus.weight": torch.zeros(1)}}, OFFICIAL_CONFIG, OVERRIDES)
    partial = {k: v for k, v in sd.items() if k != "text_queue"}
    with pytest.raises(ValueError, match="missing keys.*'text_queue'"):
        load_official_albef({"model": partial}, OFFICIAL_CONFIG, OVERRIDES)
    untied = dict(sd)
    untied["text_encoder.cls.predictions.decoder.weight"] = torch.zeros(VOCAB, HIDDEN)
    with pytest.raises(ValueError, match="ALBEF ties them"):
        load_official_albef({"model": untied}, OFFICIAL_CONFIG, OVERRIDES)
    wrong = {**OFFICIAL_CONFIG, "bert_config": {**BERT_CONFIG, "fusion_layer": 3}}
    with pytest.raises(ValueError, match="fusion_layer=3 but the tensors say 2"):
        load_official_albef({"model": sd}, wrong, OVERRIDES)
    with pytest.raises(ValueError, match="lacks.*bert_config"):
        load_official_albef({"model": sd}, {k: v for k, v in OFFICIAL_CONFIG.items() if k != "bert_config"})
    with pytest.raises(ValueError, match="stores no 'config'"):
        load_official_albef({"model": sd})


def test_official_config_from_json_and_resolution_change(tmp_path):
    import json
    sd = synthetic_official_state_dict()
    (tmp_path / "config_bert.json").write_text(json.dumps(BERT_CONFIG))
    cfg = {**OFFICIAL_CONFIG, "bert_config": str(tmp_path / "config_bert.json"), "image_res": 48}
    (tmp_path / "Pretrain.json").write_text(json.dumps(cfg))
    torch.save({"model": sd, "config": cfg}, tmp_path / "ALBEF.pth")
    model = load_official_albef(str(tmp_path / "ALBEF.pth"), str(tmp_path / "Pretrain.json"), OVERRIDES)
    assert model.visual_encoder.pos_embed.shape[1] == 1 + (48 // PATCH) ** 2
    assert model.visual_encoder_m.pos_embed.shape[1] == 1 + (48 // PATCH) ** 2
    assert model.config.fusion_layer == FUSION and model.config.queue_size == QUEUE
    from epic.models.albef.convert_albef import official_albef_config
    assert official_albef_config(str(tmp_path / "ALBEF.pth"), None, OVERRIDES) == model.config  # stored config
    # the class token's position is kept, the patch grid is resampled bicubically as ALBEF's interpolate_pos_embed
    assert torch.equal(model.visual_encoder.pos_embed[:, 0], sd["visual_encoder.pos_embed"][:, 0])


def test_deit_initialisation(tmp_path):
    from timm.models.vision_transformer import VisionTransformer
    deit = VisionTransformer(img_size=16, patch_size=PATCH, embed_dim=VW, depth=VDEPTH, num_heads=VHEADS,
                             num_classes=10)
    torch.save({"model": deit.state_dict()}, tmp_path / "deit.pth")
    model = ALBEF(ALBEFConfig.tiny(vit_pretrained=str(tmp_path / "deit.pth")))
    assert torch.equal(model.visual_encoder.blocks[1].mlp.fc2.weight, deit.blocks[1].mlp.fc2.weight)
    assert model.visual_encoder.pos_embed.shape[1] == 1 + (32 // PATCH) ** 2
    assert torch.equal(model.visual_encoder_m.blocks[0].attn.qkv.weight, deit.blocks[0].attn.qkv.weight)
    small = VisionTransformer(img_size=16, patch_size=PATCH, embed_dim=VW, depth=1, num_heads=VHEADS)
    torch.save({"model": small.state_dict()}, tmp_path / "small.pth")
    with pytest.raises(ValueError, match="missing.*blocks.1"):
        ALBEF(ALBEFConfig.tiny(vit_pretrained=str(tmp_path / "small.pth")))


def test_bert_initialisation_from_a_local_hf_folder(tmp_path):
    """text_pretrained: an HF BERT's layers become ALBEF's text layers (its first fusion_layer layers give the text
    encoder; the cross-attention stays random), as ALBEF's BertForMaskedLM.from_pretrained(bert-base-uncased)."""
    from transformers import BertConfig, BertForMaskedLM
    hf = BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                    intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0)).eval()
    hf.save_pretrained(str(tmp_path))
    model = ALBEF(ALBEFConfig.tiny(text_pretrained=str(tmp_path))).eval()
    _, ids, mask = inputs()
    with torch.no_grad():
        ours = model.encode_text(ids, mask)
        ref = hf.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[FUSION]
    assert rel_err(ours, ref) < 1e-5
    assert torch.equal(model.text_encoder.cls.predictions.transform.dense.weight,
                       hf.cls.predictions.transform.dense.weight)
    assert torch.equal(model.text_encoder_m.bert.embeddings.word_embeddings.weight,  # momentum copy made after
                       hf.bert.embeddings.word_embeddings.weight)


def test_momentum_copies_are_not_trained_and_not_in_param_groups():
    model = ALBEF(ALBEFConfig.tiny(consistency_head=True))
    spec = model.param_groups_spec()
    listed = [name for group in spec.values() for names in group.values() for name in names]
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert sorted(listed) == sorted(trainable) and len(listed) == len(set(listed))
    # the momentum copies hold their weights as buffers: never parameters, so never in an optimizer or a ZeRO
    # partition, and left in fp32 by DeepSpeed's half-precision cast (which casts parameters only)
    assert not [name for name, _ in model.named_parameters() if name.split(".")[0].endswith("_m")]
    buffers = dict(model.named_buffers())
    momentum = [name for name in buffers if name.split(".")[0].endswith("_m")]
    untracked = {"temp", "itm_head.weight", "itm_head.bias", "itc_score.weight", "itc_score.bias"}
    assert {name.replace("_m.", ".", 1) for name in momentum} == set(trainable) - untracked
    assert {"image_queue", "text_queue", "queue_ptr", "momentum_step"} <= set(buffers)
    assert "text_encoder.bert.encoder.layer.2.crossattention.self.key.weight" in spec["fusion"]["decay"]
    assert "text_encoder.bert.encoder.layer.1.attention.self.key.weight" in spec["backbone"]["decay"]
    assert "itc_score.weight" in spec["head"]["decay"] and "temp" in spec["head"]["decay"]
    assert "visual_encoder.norm.weight" in spec["backbone"]["no_decay"]
    # the momentum copies start equal to the online weights (ALBEF's copy_params)
    for p, p_m in model.momentum_pairs():
        assert torch.equal(p, p_m) and p_m.dtype == torch.float32
    # the momentum decoder stays tied to the momentum word embeddings through dtype/device moves
    model.double()
    head = model.text_encoder_m.cls.predictions
    assert head.decoder.weight is model.text_encoder_m.bert.embeddings.word_embeddings.weight
    assert head.decoder.bias is head.bias


def test_momentum_update_formula():
    model = ALBEF(ALBEFConfig.tiny())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    with torch.no_grad():
        for p_m in model.state_dict().values():  # distinct momentum values (the copies start equal)
            if p_m.is_floating_point():
                p_m.copy_(torch.randn(p_m.shape, generator=g))
    before = {**{n: p.clone() for n, p in model.named_parameters()},
              **{n: b.clone() for n, b in model.named_buffers()}}
    model.momentum_update()
    checked = 0
    for online, momentum in (("visual_encoder", "visual_encoder_m"), ("vision_proj", "vision_proj_m"),
                             ("text_encoder", "text_encoder_m"), ("text_proj", "text_proj_m")):
        for name, _ in getattr(model, online).named_parameters():
            p_m = dict(model.named_buffers())[f"{momentum}.{name}"]
            expected = 0.995 * before[f"{momentum}.{name}"] + 0.005 * before[f"{online}.{name}"]
            torch.testing.assert_close(p_m, expected, rtol=1e-6, atol=1e-6)
            checked += 1
    assert checked == len(model.momentum_pairs()) > 0
    for name, p in model.named_parameters():  # online weights untouched
        assert torch.equal(p, before[name])


def test_momentum_stays_fp32_under_a_bf16_model_and_still_moves():
    """A bf16 store would round a 0.5% step of weights this close to zero change; the fp32 copies keep it."""
    torch.manual_seed(0)
    model = ALBEF(ALBEFConfig.tiny())
    for p in model.parameters():  # what DeepSpeed's bf16 cast does: parameters only
        p.data = p.data.to(torch.bfloat16)
    p, p_m = next((p, p_m) for p, p_m in model.momentum_pairs() if p.ndim == 2)
    assert p.dtype == torch.bfloat16 and p_m.dtype == torch.float32
    with torch.no_grad():
        p.mul_(1.01)  # the online weight moved 1% away from its copy
    start = p_m.clone()
    model.momentum_update()
    torch.testing.assert_close(p_m, 0.995 * start + 0.005 * p.float(), rtol=1e-6, atol=1e-7)
    moved = start != 0
    assert (p_m[moved] != start[moved]).all()
    bf16_store = (0.995 * start.to(torch.bfloat16) + 0.005 * p).to(torch.bfloat16)
    assert (bf16_store == start.to(torch.bfloat16)).float().mean() > 0.9  # what a bf16 copy would have kept
    batch = _batch(3)
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    out = albef_losses(model, batch, alpha=0.4, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss) and model.image_queue.dtype == torch.float32


def test_clamped_temperature_and_consistency_head():
    model = ALBEF(ALBEFConfig.tiny(consistency_head=True))
    with torch.no_grad():
        model.temp.fill_(3.0)
    assert model.temperature().item() == pytest.approx(0.5)
    with torch.no_grad():
        model.temp.fill_(-1.0)
    assert model.temperature().item() == pytest.approx(0.001)
    assert model.consistency_head().in_features == 32 and model.consistency_head().out_features == 1
    assert ALBEF(ALBEFConfig.tiny()).consistency_head() is None


@pytest.mark.parametrize("choice", ["fused_cls", "image_cls_cross"])
def test_saliency_query_keys_and_teacher(official, choice):
    sd, base = official
    model = load_official_albef({"model": sd}, OFFICIAL_CONFIG, {**OVERRIDES, "saliency": choice}).eval()
    image, ids, mask = inputs()
    query, keys = model.saliency_qk(ids, mask, pixel_values=image)
    # reference: the input of the penultimate fusion layer (index LAYERS - 2), then its projections
    image_embeds = ref_vit(sd, "visual_encoder.", image)
    x = ref_bert(sd, "text_encoder", "text", mask, input_ids=ids)
    pen = LAYERS - 2
    for i in range(FUSION, pen):
        x = ref_bert_layer(sd, f"text_encoder.bert.encoder.layer.{i}.", i, x, extended(mask), image_embeds,
                           extended(torch.ones(image_embeds.shape[:2])))
    p = f"text_encoder.bert.encoder.layer.{pen}."

    def heads(t):
        return t.view(t.shape[0], t.shape[1], HEADS, HIDDEN // HEADS).transpose(1, 2)

    if choice == "fused_cls":
        ref_q = heads(lin(sd, p + "attention.self.query", x[:, :1]))[:, :, 0]
        ref_k = heads(lin(sd, p + "attention.self.key", x))
    else:
        a = ln(sd, p + "attention.output.LayerNorm", lin(sd, p + "attention.output.dense", ref_self_attention(
            sd, p + "attention.self.", x, x, extended(mask))) + x, 1e-12)
        ref_q = heads(lin(sd, p + "crossattention.self.key", image_embeds[:, :1]))[:, :, 0]
        ref_k = heads(lin(sd, p + "crossattention.self.query", a))
    assert rel_err(query, ref_q) < 1e-5 and rel_err(keys, ref_k) < 1e-5
    teacher = model.saliency_teacher()
    assert not any(p.requires_grad for p in teacher.parameters())
    assert len(teacher.text_encoder.bert.encoder.layer) == pen + 1
    assert not hasattr(teacher, "visual_encoder_m") and not hasattr(teacher, "image_queue")
    tq, tk = teacher.saliency_qk(ids, mask, pixel_values=image)
    assert torch.equal(tq, query) and torch.equal(tk, keys)
    assert len(model.text_encoder.bert.encoder.layer) == LAYERS  # the source model is untouched
    with pytest.raises(AttributeError, match="pruned saliency teacher"):
        teacher.infer(ids, mask, pixel_values=image)


# ----------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------
def test_contrastive_loss_with_momentum_distillation_by_hand():
    g = torch.Generator().manual_seed(0)
    b, d, q, alpha, temp = 2, 3, 2, 0.4, 0.5
    unit = lambda *s: F.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=-1)
    img, txt, img_m, txt_m = unit(b, d), unit(b, d), unit(b, d), unit(b, d)
    img_q, txt_q = unit(q, d), unit(q, d)  # queue entries as rows
    out = contrastive_loss(img, txt, img_m, txt_m, img_q.t(), txt_q.t(), torch.tensor(temp), alpha)

    def dot(u, v):
        return sum(float(u[k]) * float(v[k]) for k in range(d))

    def direction(query, query_m, keys_m, queue):
        columns = [keys_m[j] for j in range(b)] + [queue[j] for j in range(q)]
        total = 0.0
        for i in range(b):
            s = [dot(query[i], c) / temp for c in columns]
            s_m = [dot(query_m[i], c) / temp for c in columns]
            z_m = sum(math.exp(v) for v in s_m)
            z = sum(math.exp(v) for v in s)
            for j in range(b + q):
                target = alpha * math.exp(s_m[j]) / z_m + (1 - alpha) * (1.0 if j == i else 0.0)
                total -= target * (s[j] - math.log(z))
        return total / b

    expected = (direction(img, img_m, txt_m, txt_q) + direction(txt, txt_m, img_m, img_q)) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.sim_i2t.shape == (b, b + q)
    # alpha 0: plain InfoNCE over batch + queue
    plain = contrastive_loss(img, txt, img_m, txt_m, img_q.t(), txt_q.t(), torch.tensor(temp), 0.0)
    s = img.float() @ torch.cat([txt_m.float(), txt_q.float()]).t() / temp
    s2 = txt.float() @ torch.cat([img_m.float(), img_q.float()]).t() / temp
    ce = (F.cross_entropy(s, torch.arange(b)) + F.cross_entropy(s2, torch.arange(b))) / 2
    assert plain.loss.item() == pytest.approx(ce.item(), rel=1e-6)


def test_alpha_ramp_over_the_first_epoch():
    assert alpha_ramp(0.4, 0, 100) == 0.0
    assert alpha_ramp(0.4, 50, 100) == pytest.approx(0.2)
    assert alpha_ramp(0.4, 100, 100) == pytest.approx(0.4)
    assert alpha_ramp(0.4, 5000, 100) == pytest.approx(0.4)
    assert alpha_ramp(0.4, 3, 0) == 0.4


def test_queue_enqueue_wraps_around_with_two_ranks_gathered():
    dim, size, per_rank = 2, 6, 2
    steps = [[torch.full((per_rank, dim), float(10 * s + r)) for r in range(2)] for s in range(3)]
    queues = []
    for rank in range(2):  # every rank applies the same gathered features: the queues stay identical
        image_queue, text_queue = torch.zeros(dim, size), torch.zeros(dim, size)
        ptr = torch.zeros(1, dtype=torch.long)
        pointers = []
        for parts in steps:
            image_local, text_local = parts[rank], -parts[rank]

            def gathered(x, parts=parts, image_local=image_local):  # what all_gather returns, in rank order
                return torch.cat(parts) if x is image_local else -torch.cat(parts)

            dequeue_and_enqueue(image_queue, text_queue, ptr, image_local, text_local, gather=gathered)
            pointers.append(int(ptr))
        queues.append((image_queue, text_queue))
        assert pointers == [4, 2, 0]
    assert torch.equal(queues[0][0], queues[1][0]) and torch.equal(queues[0][1], queues[1][1])
    image_queue, text_queue = queues[0]
    # step 0 wrote columns 0-3 (rank 0: 0,1; rank 1: 2,3), step 1 columns 4,5,0,1, step 2 columns 2,3,4,5
    assert image_queue[0].tolist() == [11.0, 11.0, 20.0, 20.0, 21.0, 21.0]
    assert torch.equal(text_queue, -image_queue)
    with pytest.raises(ValueError, match="do not fit a queue"):
        enqueue(torch.zeros(dim, 3), torch.zeros(4, dim), 0)
    assert torch.equal(gather_features(torch.ones(2, 2)), torch.ones(2, 2))  # no process group: identity


def _gather_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    image_queue, text_queue = torch.zeros(2, 8), torch.zeros(2, 8)
    ptr = torch.zeros(1, dtype=torch.long)
    for step in range(3):
        feats = torch.full((2, 2), float(10 * step + rank))
        dequeue_and_enqueue(image_queue, text_queue, ptr, feats, feats + 0.5)
    torch.save({"image": image_queue, "text": text_queue, "ptr": ptr}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_queue_all_gather_across_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp
    # fork: the children inherit the imported modules (spawn would import torch and epic again in each)
    mp.start_processes(_gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in range(2))
    assert torch.equal(r0["image"], r1["image"]) and torch.equal(r0["text"], r1["text"])
    assert int(r0["ptr"]) == int(r1["ptr"]) == (3 * 4) % 8
    # step 2 (ranks 20, 21) wrapped onto columns 0-3; step 1 (10, 11) holds columns 4-7
    assert r0["image"][0].tolist() == [20.0, 20.0, 21.0, 21.0, 10.0, 10.0, 11.0, 11.0]


def test_multinomial_guard_on_zero_nan_and_single_rows():
    sim = torch.randn(4, 4)
    sim[0] = torch.tensor([1e4, 0.0, 0.0, 0.0])  # the positive takes all softmax mass: zero row after the diagonal
    sim[1, 2] = float("nan")
    sim[2, 0] = float("inf")
    sim[3] = torch.tensor([0.0, -1e4, -1e4, 30.0]).half().float()
    official = F.softmax(sim, dim=1)
    official.fill_diagonal_(0)
    with pytest.raises(RuntimeError):  # ALBEF's own weights crash here
        torch.multinomial(official, 1)
    weights = hard_negative_weights(sim.half())
    assert weights.dtype == torch.float32 and torch.isfinite(weights).all()
    assert (weights.diagonal() == 0).all() and (weights.sum(1) > 0).all()
    off = ~torch.eye(4, dtype=torch.bool)
    assert (weights[off] > 0).all()
    torch.testing.assert_close(weights[1][off[1]], torch.full((3,), 1 / 4 + 1e-5))  # NaN row: uniform
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        neg = sample_hard_negatives(sim, sim.t().contiguous(), g)
        assert (neg["text_index"] != torch.arange(4)).all() and (neg["image_index"] != torch.arange(4)).all()
    assert sample_hard_negatives(torch.zeros(1, 5), torch.zeros(1, 5), g) is None  # B = 1: nothing to draw
    # the weights follow the softmax where it is well defined
    good = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    w = hard_negative_weights(good)
    assert w[0, 1] / w[0, 2] == pytest.approx(math.exp(2.0), rel=1e-4)


def test_itm_pairs_layout():
    negatives = {"text_index": torch.tensor([1, 2, 0]), "image_index": torch.tensor([2, 0, 1])}
    pairs = itm_pairs(3, negatives, torch.device("cpu"))
    assert pairs["labels"].tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert pairs["text_index"].tolist() == [0, 1, 2, 0, 1, 2, 1, 2, 0]
    assert pairs["image_index"].tolist() == [0, 1, 2, 2, 0, 1, 0, 1, 2]


def test_mlm_distillation_by_hand():
    logits = torch.tensor([[[1.0, 2.0, 0.0], [0.5, 0.0, 0.0]]])
    logits_m = torch.tensor([[[0.0, 1.0, 1.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[1, -100]])
    alpha = 0.4
    lp = [1.0 - math.log(math.exp(1) + math.exp(2) + 1), 2.0 - math.log(math.exp(1) + math.exp(2) + 1),
          0.0 - math.log(math.exp(1) + math.exp(2) + 1)]
    zm = 1 + 2 * math.e
    soft = [1 / zm, math.e / zm, math.e / zm]
    expected = (1 - alpha) * -lp[1] + alpha * -sum(s * v for s, v in zip(soft, lp))
    assert mlm_distillation_loss(logits, labels, logits_m, alpha).item() == pytest.approx(expected, rel=1e-6)
    assert mlm_distillation_loss(logits, labels, None, alpha).item() == pytest.approx(-lp[1], rel=1e-6)
    nothing = mlm_distillation_loss(logits.requires_grad_(), torch.full((1, 2), -100), logits_m, alpha)
    assert nothing.item() == 0.0 and nothing.requires_grad


def _batch(batch, length=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 64, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 6:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    mlm_ids = ids.clone()
    mlm_ids[:, 2] = 4
    return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": mask,
            "mlm_input_ids": mlm_ids, "mlm_labels": labels}


def test_albef_step_trains_online_weights_and_fills_the_queue():
    torch.manual_seed(0)
    model = ALBEF(ALBEFConfig.tiny())
    out = albef_losses(model, _batch(4), alpha=0.4, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss) and int(model.queue_ptr) == 4 and out.alpha == 0.4
    out.loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    for name in ("temp", "itm_head.weight", "vision_proj.weight", "text_proj.weight",
                 "text_encoder.bert.encoder.layer.3.crossattention.self.key.weight",
                 "visual_encoder.blocks.0.attn.qkv.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    mom = model.momentum_features(_batch(4)["input_ids"], _batch(4)["attention_mask"], _batch(4)["pixel_values"])
    torch.testing.assert_close(model.image_queue[:, :4].t(), mom["image_feat_m"])
    # a micro-batch of 1: no hard negative exists, ITM contributes a zero (with gradient path), nothing crashes
    model.zero_grad()
    with pytest.warns(RuntimeWarning, match="micro-batches of 1"):
        single = albef_losses(model, _batch(1), alpha=0.4)
    assert single.loss_itm.item() == 0.0 and torch.isfinite(single.loss)
    single.loss.backward()
    assert model.itm_head.weight.grad is not None and model.itm_head.weight.grad.abs().sum() == 0


def test_recipe_ramps_alpha_with_the_step_count_and_reuses_image_embeds():
    from epic.objectives.albef_losses import albef_recipe
    torch.manual_seed(0)
    model = ALBEF(ALBEFConfig.tiny(alpha_ramp_steps=4))
    batch = _batch(3)
    image_embeds = model.encode_image(batch["pixel_values"])
    alphas = []
    for _ in range(6):
        out = albef_recipe(model, batch, image_embeds, torch.Generator().manual_seed(0))
        alphas.append(float(out["alpha"]))
        model.after_optimizer_step()
    assert alphas == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4])
    assert int(model.momentum_step) == 6 and int(model.queue_ptr) == (6 * 3) % 32
    assert set(out) >= {"loss", "loss_ita", "loss_itm", "loss_mlm", "itm_acc"}
    with pytest.raises(KeyError, match="mlm_labels"):
        albef_recipe(model, {k: v for k, v in batch.items() if k != "mlm_labels"}, image_embeds, None)


# ----------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("base, epic", [("albef_4m", "epic_albef_4m"), ("albef_16m", "epic_albef_16m"),
                                        ("albef_shapes_tiny", "epic_albef_shapes_tiny")])
def test_albef_configs(base, epic):
    from epic.config import CONFIG_DIR, _read_yaml_with_extends
    from epic.models.albef.configuration_albef import config_from_dict

    vanilla = _read_yaml_with_extends(CONFIG_DIR / f"{base}.yaml")
    with_epic = _read_yaml_with_extends(CONFIG_DIR / f"{epic}.yaml")
    assert {k for k in set(vanilla) | set(with_epic) if vanilla.get(k) != with_epic.get(k)} <= {"run", "epic"}
    assert with_epic["epic"]["enabled"] is True and vanilla.get("epic", {}).get("enabled", False) is False
    model = dict(vanilla["model"])
    assert model.pop("family") == "albef"
    cfg = config_from_dict({**model, "vocab_size": model["vocab_size"] or 100, "vit_pretrained": None,
                            "text_pretrained": None})
    train = vanilla["train"]
    assert train["schedule"] == "cosine" and cfg.queue_size >= train["global_batch_size"]
    if base != "albef_shapes_tiny":  # ALBEF's recipe
        assert (train["global_batch_size"], vanilla["data"]["micro_batch_size"]) == (512, 64)
        assert (train["lr"], train["weight_decay"], train["final_lr_scale"]) == (1e-4, 0.02, 0.1)
        assert (cfg.image_size, cfg.fusion_layer, cfg.num_hidden_layers, cfg.embed_dim) == (256, 6, 12, 256)
        assert (cfg.queue_size, cfg.momentum, cfg.temp, cfg.alpha) == (65536, 0.995, 0.07, 0.4)
        steps_per_epoch = cfg.alpha_ramp_steps
        assert train["max_steps"] == pytest.approx(30 * steps_per_epoch, rel=0.01)  # cosine over 30 epochs
        assert train["warmup_ratio"] * train["max_steps"] == pytest.approx(2000, rel=0.01)


def test_consistency_head_does_not_change_the_other_draws():
    torch.manual_seed(0)
    plain = ALBEF(ALBEFConfig.tiny())
    torch.manual_seed(0)
    with_head = ALBEF(ALBEFConfig.tiny(consistency_head=True))
    others = {k: v for k, v in with_head.state_dict().items() if not k.startswith("itc_score.")}
    assert others.keys() == plain.state_dict().keys()
    for key, value in plain.state_dict().items():
        assert torch.equal(others[key], value), key


def test_recipe_runs_on_the_meta_device_with_the_flops_of_a_real_batch():
    """The trainer counts FLOPs per sample on the meta device (no data, no memory): the recipe must run there and
    count what a real batch with the same number of MLM targets costs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ALBEFConfig.tiny(mlm_probability=0.25)
    length, batch_size = 8, 3
    real = _batch(batch_size, length)
    real["mlm_labels"] = torch.full_like(real["input_ids"], -100)
    real["mlm_labels"][:, [1, 5]] = real["input_ids"][:, [1, 5]]  # 2 = round(0.25 * 8) targets per caption

    def count(model, batch):
        # the math attention backend on both devices (the CPU's fused SDPA kernel is invisible to FlopCounterMode)
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            albef_losses(model, batch, None, torch.Generator()).loss.backward()
        return counter.get_total_flops()

    torch.manual_seed(0)
    flops_real = count(ALBEF(cfg), real)
    with torch.device("meta"):
        meta_model = ALBEF(cfg)
    meta = {k: torch.empty_like(v, device="meta") for k, v in real.items()}
    assert count(meta_model, meta) == flops_real > 0


def test_hard_negatives_follow_the_softmax_over_the_other_samples():
    """ALBEF draws negative j for row i with probability softmax(sim_i)_j renormalised over j != i."""
    sim = torch.tensor([[0.0, 1.0, 2.0], [0.5, 3.0, -1.0], [1.0, 1.0, 0.0]])
    draws = 6000
    big = sim.repeat(draws, 1)  # the guard acts per row; square blocks keep the diagonal where it belongs
    counts = torch.zeros(3, 3)
    g = torch.Generator().manual_seed(0)
    for block in big.split(3):
        neg = sample_hard_negatives(block, block, g)["text_index"]
        counts[torch.arange(3), neg] += 1
    expected = F.softmax(sim, dim=1)
    expected.fill_diagonal_(0)
    expected = expected / expected.sum(1, keepdim=True)
    torch.testing.assert_close(counts / draws, expected, atol=0.025, rtol=0)
