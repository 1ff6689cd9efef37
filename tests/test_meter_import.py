"""Official METER checkpoint import, checked against an independent re-implementation of METER's forward.

The reference below reads METER's own key layout (OpenAI-CLIP ``in_proj_weight`` attention, HF RoBERTa names,
``BertCrossLayer`` names) and writes every operation out by hand; it shares no code with epic.models.
"""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from epic.models.meter import METER, load_official_meter, meter_config_from_official, to_official_state_dict

# Sizes of the synthetic "official" checkpoint. Widths are multiples of 64 so METER's head rule (width // 64)
# gives 2 ViT heads, 1 text head and 2 fusion heads.
W, PATCH, GRID, CLIP_BLOCKS = 128, 16, 3, 12  # a 12-block CLIP file: METER uses the first 11
T, TEXT_LAYERS, TEXT_FFN, VOCAB, MAX_POS, PAD = 64, 2, 96, 50, 12, 1
H, FUSION_LAYERS, EMBED = 128, 2, 32
IMAGE = GRID * PATCH


def make_official_state_dict(seed=0, token_types=2):
    """Every key an official METER pretraining checkpoint holds, with random values."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.1, offset=0.0):
        return torch.randn(*shape, generator=g) * scale + offset

    def linear(prefix, out_features, in_features):
        return {prefix + ".weight": r(out_features, in_features, scale=in_features ** -0.5),
                prefix + ".bias": r(out_features, scale=0.05)}

    def layer_norm(prefix, width):
        return {prefix + ".weight": r(width, offset=1.0), prefix + ".bias": r(width, scale=0.05)}

    def bert_attention(prefix, width):
        sd = {}
        for name in ("query", "key", "value"):
            sd.update(linear(f"{prefix}.self.{name}", width, width))
        sd.update(linear(f"{prefix}.output.dense", width, width))
        sd.update(layer_norm(f"{prefix}.output.LayerNorm", width))
        return sd

    def bert_ffn(prefix, width, inner):
        return {**linear(f"{prefix}.intermediate.dense", inner, width), **linear(f"{prefix}.output.dense", width, inner),
                **layer_norm(f"{prefix}.output.LayerNorm", width)}

    v = "vit_model.visual."
    sd = {v + "class_embedding": r(W), v + "positional_embedding": r(GRID * GRID + 1, W),
          v + "conv1.weight": r(W, 3, PATCH, PATCH, scale=0.05), v + "proj": r(W, EMBED),
          **layer_norm(v + "ln_pre", W), **layer_norm(v + "ln_post", W)}
    for i in range(CLIP_BLOCKS):
        p = f"{v}transformer.resblocks.{i}."
        sd.update({p + "attn.in_proj_weight": r(3 * W, W, scale=W ** -0.5), p + "attn.in_proj_bias": r(3 * W, scale=0.05),
                   **linear(p + "attn.out_proj", W, W), **layer_norm(p + "ln_1", W), **layer_norm(p + "ln_2", W),
                   **linear(p + "mlp.c_fc", 4 * W, W), **linear(p + "mlp.c_proj", W, 4 * W)})
    # CLIP's unused text tower, kept in METER's checkpoints
    sd.update({"vit_model.positional_embedding": r(77, EMBED), "vit_model.token_embedding.weight": r(100, EMBED),
               "vit_model.text_projection": r(EMBED, EMBED), "vit_model.logit_scale": torch.tensor(4.6),
               **layer_norm("vit_model.ln_final", EMBED),
               **layer_norm("vit_model.transformer.resblocks.0.ln_1", EMBED)})
    t = "text_transformer."
    sd.update({t + "embeddings.word_embeddings.weight": r(VOCAB, T),
               t + "embeddings.position_embeddings.weight": r(MAX_POS, T),
               t + "embeddings.token_type_embeddings.weight": r(1, T),
               t + "embeddings.position_ids": torch.arange(MAX_POS)[None],
               **layer_norm(t + "embeddings.LayerNorm", T), **linear(t + "pooler.dense", T, T)})
    for i in range(TEXT_LAYERS):
        sd.update(bert_attention(f"{t}encoder.layer.{i}.attention", T))
        sd.update(bert_ffn(f"{t}encoder.layer.{i}", T, TEXT_FFN))
    sd.update({**linear("cross_modal_text_transform", H, T), **linear("cross_modal_image_transform", H, W),
               "token_type_embeddings.weight": r(token_types, H, scale=0.5)})
    for stream in ("text", "image"):
        for i in range(FUSION_LAYERS):
            p = f"cross_modal_{stream}_layers.{i}"
            sd.update(bert_attention(p + ".attention", H))
            sd.update(bert_attention(p + ".crossattention", H))
            sd.update(bert_ffn(p, H, 4 * H))
        sd.update(linear(f"cross_modal_{stream}_pooler.dense", H, H))
    sd.update({**linear("mlm_score.transform.dense", H, H), **layer_norm("mlm_score.transform.LayerNorm", H),
               "mlm_score.decoder.weight": r(VOCAB, H, scale=H ** -0.5), "mlm_score.bias": r(VOCAB, scale=0.05),
               **linear("itm_score.fc", 2, 2 * H)})
    return sd


# --------------------------------------------------------------------------------------- reference forward
def ln(x, sd, prefix, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * sd[prefix + ".weight"] + sd[prefix + ".bias"]


def lin(x, sd, prefix):
    return x @ sd[prefix + ".weight"].T + sd[prefix + ".bias"]


def softmax_attention(q, k, v, heads, key_mask=None):
    b, lq, width = q.shape
    d = width // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if key_mask is not None:
        scores = scores + (1.0 - key_mask[:, None, None, :].float()) * -10000.0
    probs = torch.exp(scores - scores.amax(-1, keepdim=True))
    probs = probs / probs.sum(-1, keepdim=True)
    return (probs @ v).transpose(1, 2).reshape(b, lq, width)


def reference_clip_visual(sd, pixels, heads):
    """OpenAI CLIP VisualTransformer as METER runs it: 11 blocks, ln_post on every token."""
    v = "vit_model.visual."
    conv = sd[v + "conv1.weight"]
    patch = conv.shape[-1]
    b = pixels.shape[0]
    patches = pixels.unfold(2, patch, patch).unfold(3, patch, patch)  # [B, 3, g, g, p, p]
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, -1, 3 * patch * patch)
    x = patches @ conv.reshape(conv.shape[0], -1).T
    x = torch.cat([sd[v + "class_embedding"].expand(b, 1, -1), x], dim=1) + sd[v + "positional_embedding"]
    x = ln(x, sd, v + "ln_pre", 1e-5)
    for i in range(CLIP_BLOCKS - 1):
        p = f"{v}transformer.resblocks.{i}."
        h = ln(x, sd, p + "ln_1", 1e-5)
        q, k, val = (h @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]).chunk(3, dim=-1)
        x = x + lin(softmax_attention(q, k, val, heads), sd, p + "attn.out_proj")
        h = lin(ln(x, sd, p + "ln_2", 1e-5), sd, p + "mlp.c_fc")
        x = x + lin(h * torch.sigmoid(1.702 * h), sd, p + "mlp.c_proj")  # QuickGELU
    return ln(x, sd, v + "ln_post", 1e-5)


def gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def bert_attention_block(sd, prefix, x, context, context_mask, heads, eps):
    attended = softmax_attention(lin(x, sd, prefix + ".self.query"), lin(context, sd, prefix + ".self.key"),
                                 lin(context, sd, prefix + ".self.value"), heads, context_mask)
    return ln(lin(attended, sd, prefix + ".output.dense") + x, sd, prefix + ".output.LayerNorm", eps)


def bert_ffn_block(sd, prefix, x, eps):
    return ln(lin(gelu(lin(x, sd, prefix + ".intermediate.dense")), sd, prefix + ".output.dense") + x,
              sd, prefix + ".output.LayerNorm", eps)


def reference_roberta(sd, ids, mask, heads, eps=1e-5):
    t = "text_transformer."
    real = (ids != PAD).long()
    positions = torch.cumsum(real, dim=1) * real + PAD  # RoBERTa/fairseq positions
    x = (sd[t + "embeddings.word_embeddings.weight"][ids] + sd[t + "embeddings.position_embeddings.weight"][positions]
         + sd[t + "embeddings.token_type_embeddings.weight"][0])
    x = ln(x, sd, t + "embeddings.LayerNorm", eps)
    for i in range(TEXT_LAYERS):
        p = f"{t}encoder.layer.{i}"
        x = bert_attention_block(sd, p + ".attention", x, x, mask, heads, eps)
        x = bert_ffn_block(sd, p, x, eps)
    return x


def reference_meter_infer(sd, ids, mask, pixels, vit_heads, text_heads, heads, eps=1e-12):
    """meter_module.infer: towers → transforms + token types → parallel co-attention layers → poolers."""
    text = lin(reference_roberta(sd, ids, mask, text_heads), sd, "cross_modal_text_transform")
    image = lin(reference_clip_visual(sd, pixels, vit_heads), sd, "cross_modal_image_transform")
    x = text + sd["token_type_embeddings.weight"][0]
    y = image + sd["token_type_embeddings.weight"][1]
    image_mask = torch.ones(y.shape[:2])
    for i in range(FUSION_LAYERS):
        def layer(stream, own, other, own_mask, other_mask):
            p = f"cross_modal_{stream}_layers.{i}"
            h = bert_attention_block(sd, p + ".attention", own, own, own_mask, heads, eps)
            h = bert_attention_block(sd, p + ".crossattention", h, other, other_mask, heads, eps)
            return bert_ffn_block(sd, p, h, eps)

        x, y = layer("text", x, y, mask, image_mask), layer("image", y, x, image_mask, mask)
    cls = torch.cat([torch.tanh(lin(x[:, 0], sd, "cross_modal_text_pooler.dense")),
                     torch.tanh(lin(y[:, 0], sd, "cross_modal_image_pooler.dense"))], dim=-1)
    return {"text_feats": x, "image_feats": y, "cls_feats": cls}


def reference_mlm_logits(sd, text_feats):
    hidden = ln(gelu(lin(text_feats, sd, "mlm_score.transform.dense")), sd, "mlm_score.transform.LayerNorm", 1e-12)
    return hidden @ sd["mlm_score.decoder.weight"].T + sd["mlm_score.bias"]


# --------------------------------------------------------------------------------------- tests
def inputs(seed=1, batch=3, length=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    ids[:, 0] = 0
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 4:] = 0
    ids[1, 4:] = PAD
    return ids, mask, torch.randn(batch, 3, IMAGE, IMAGE, generator=g)


def save_lightning_checkpoint(sd, path):
    torch.save({"epoch": 3, "global_step": 100, "pytorch-lightning_version": "1.3.2", "state_dict": sd,
                "hyper_parameters": {"config": {"max_text_len": 40}}}, path)
    return str(path)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    sd = make_official_state_dict()
    path = save_lightning_checkpoint(sd, tmp_path_factory.mktemp("ckpt") / "meter.ckpt")
    return sd, path, load_official_meter(path).eval()


def test_imported_model_matches_the_official_forward(official):
    sd, _, model = official
    cfg = model.config
    assert (cfg.vit_layers, cfg.vit_width, cfg.vit_heads, cfg.image_size, cfg.patch_size) == (11, W, 2, IMAGE, PATCH)
    assert (cfg.text_model_type, cfg.text_hidden_size, cfg.text_heads, cfg.text_layers) == ("roberta", T, 1, TEXT_LAYERS)
    assert (cfg.vocab_size, cfg.text_max_position_embeddings, cfg.text_intermediate_size) == (VOCAB, MAX_POS, TEXT_FFN)
    assert (cfg.hidden_size, cfg.num_heads, cfg.num_fusion_layers, cfg.num_token_types) == (H, 2, FUSION_LAYERS, 2)
    ids, mask, pixels = inputs()
    with torch.no_grad():
        ours = model.infer(ids, mask, pixel_values=pixels)
        reference = reference_meter_infer(sd, ids, mask, pixels, vit_heads=2, text_heads=1, heads=2)
    for key in ("text_feats", "image_feats", "cls_feats"):
        torch.testing.assert_close(ours[key], reference[key], rtol=1e-4, atol=1e-4, msg=key)
    torch.testing.assert_close(model.mlm_score(ours["text_feats"]), reference_mlm_logits(sd, reference["text_feats"]),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.itm_score(ours["cls_feats"]), lin(reference["cls_feats"], sd, "itm_score.fc"),
                               rtol=1e-4, atol=1e-4)


def test_round_trip_ours_to_official_layout_and_back(official):
    sd, _, model = official
    exported = to_official_state_dict(model)
    for key, value in exported.items():  # the export is METER's layout, value for value
        torch.testing.assert_close(value, sd[key], rtol=0, atol=0, msg=key)
    again = load_official_meter(exported).eval()
    ids, mask, pixels = inputs(seed=2)
    with torch.no_grad():
        a, b = model.infer(ids, mask, pixel_values=pixels), again.infer(ids, mask, pixel_values=pixels)
    for key in ("text_feats", "image_feats", "cls_feats"):
        assert torch.equal(a[key], b[key]), key


def test_missing_and_unexpected_keys_are_listed():
    sd = make_official_state_dict()
    del sd["cross_modal_image_layers.1.crossattention.self.key.bias"]
    sd["cross_modal_text_layers.0.adapter.weight"] = torch.zeros(2)
    with pytest.raises(ValueError) as err:
        load_official_meter(sd)
    message = str(err.value)
    assert "cross_modal_image_layers.1.crossattention.self.key.bias" in message and "missing" in message
    assert "cross_modal_text_layers.0.adapter.weight" in message and "unexpected" in message


def test_fine_tuned_checkpoint_without_pretraining_heads():
    sd = {k: v for k, v in make_official_state_dict(token_types=3).items() if not k.startswith(("mlm_score", "itm"))}
    sd["nlvr2_classifier.0.weight"] = torch.zeros(2 * H, 4 * H)  # a downstream head: skipped, not an error
    with pytest.raises(ValueError, match="allow_missing_heads=True"):
        load_official_meter(sd)
    model = load_official_meter(sd, allow_missing_heads=True)
    assert model.config.num_token_types == 3


def test_config_json_overrides_heads_and_resolution(tmp_path):
    sd = make_official_state_dict()
    config = tmp_path / "meter.json"
    config.write_text(json.dumps({"num_heads": 4, "text_heads": 2, "max_text_len": 40, "image_size": 64}))
    model = load_official_meter(sd, str(config)).eval()
    assert (model.config.num_heads, model.config.text_heads, model.config.max_text_len) == (4, 2, 40)
    assert model.vit_model.pos_embed.shape == (1, 17, W)  # 3x3 grid resampled to 4x4, as adapt_position_encoding
    ids, mask, pixels = inputs()
    same_size = load_official_meter(sd, {"num_heads": 4, "text_heads": 2}).eval()
    with torch.no_grad():
        ours = same_size.infer(ids, mask, pixel_values=pixels)
        reference = reference_meter_infer(sd, ids, mask, pixels, vit_heads=2, text_heads=2, heads=4)
    torch.testing.assert_close(ours["cls_feats"], reference["cls_feats"], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="vocab_size=51"):
        load_official_meter(sd, {"vocab_size": 51})
    assert meter_config_from_official(sd, {"vit_layers": 12}).vit_layers == 12  # keep CLIP's 12th block on request
    with pytest.raises(ValueError, match="vit_layers=13"):
        meter_config_from_official(sd, {"vit_layers": 13})


def test_convert_tool_writes_a_loadable_folder(official, tmp_path):
    spec = importlib.util.spec_from_file_location(
        "convert_meter_ckpt", Path(__file__).resolve().parents[1] / "tools" / "convert_meter_ckpt.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    sd, path, model = official
    tool.main(["--src", path, "--out", str(tmp_path / "out")])
    loaded = METER.from_pretrained(str(tmp_path / "out")).eval()
    assert loaded.config == model.config
    ids, mask, pixels = inputs(seed=3)
    with torch.no_grad():
        assert torch.equal(loaded.infer(ids, mask, pixels)["cls_feats"], model.infer(ids, mask, pixels)["cls_feats"])


# --------------------------------------------------------------------------------------- METER's own config keys
def meter_own_config(**changes):
    """A dict as METER's meter/config.py (+ clip16, text_roberta) spells it, for the synthetic sizes."""
    config = {"exp_name": "mlm_itm", "seed": 0, "datasets": ["coco", "vg", "sbu", "gcc"],
              "loss_names": {"itm": 1, "mlm": 1, "mpp": 0, "vqa": 0, "nlvr2": 0, "irtr": 0, "contras": 0, "snli": 0},
              "batch_size": 4096, "train_transform_keys": ["clip"], "val_transform_keys": ["clip"],
              "image_size": IMAGE, "patch_size": PATCH, "draw_false_image": 1, "image_only": False,
              "resolution_before": 224, "vqav2_label_size": 3129, "max_text_len": 40, "tokenizer": "roberta-base",
              "vocab_size": VOCAB, "whole_word_masking": True, "mlm_prob": 0.15, "draw_false_text": 0,
              "num_top_layer": FUSION_LAYERS, "input_image_embed_size": W, "input_text_embed_size": T,
              "vit": "ViT-B/16", "hidden_size": H, "num_heads": 4, "num_layers": 6, "mlp_ratio": 4, "drop_rate": 0.0,
              "optim_type": "adamw", "learning_rate": 1e-5, "weight_decay": 0.01, "decay_power": 1, "max_epoch": 10,
              "max_steps": 100000, "warmup_steps": 0.1, "end_lr": 0, "lr_mult_head": 5, "lr_mult_cross_modal": 5,
              "get_recall_metric": False, "resume_from": None, "fast_dev_run": False, "val_check_interval": 1.0,
              "test_only": False, "data_root": "/data", "log_dir": "result", "per_gpu_batchsize": 32,
              "num_gpus": 8, "num_nodes": 1, "load_path": "", "num_workers": 8, "precision": 32}
    config.update(changes)
    return config


def test_importer_accepts_meters_own_config_dict():
    sd = make_official_state_dict()
    model = load_official_meter(sd, meter_config=meter_own_config()).eval()
    cfg = model.config
    assert (cfg.num_heads, cfg.max_text_len, cfg.dropout, cfg.num_fusion_layers, cfg.mlp_ratio) == (4, 40, 0.0,
                                                                                                   FUSION_LAYERS, 4)
    assert cfg.text_model_type == "roberta" and cfg.text_layer_norm_eps == 1e-5 and cfg.patch_size == PATCH
    report = model.official_config_report["meter_config"]
    assert report["used"]["num_top_layer"] == "num_fusion_layers" and report["used"]["drop_rate"] == "dropout"
    assert report["used"]["input_image_embed_size"] == "vit_width" and report["used"]["vit"] == "patch_size"
    assert {"learning_rate", "datasets", "per_gpu_batchsize", "num_layers", "precision"} <= set(report["ignored"])
    assert not set(report["used"]) & set(report["ignored"])
    ids, mask, pixels = inputs()
    with torch.no_grad():  # 4 fusion heads, as the config says (the width // 64 rule would give 2)
        ours = model.infer(ids, mask, pixel_values=pixels)
        reference = reference_meter_infer(sd, ids, mask, pixels, vit_heads=2, text_heads=1, heads=4)
    torch.testing.assert_close(ours["cls_feats"], reference["cls_feats"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("changes, needle", [
    ({"num_top_layer": 3}, "num_fusion_layers=3 but the tensors say 2"),
    ({"vit": "ViT-B/32", "patch_size": 32}, "patch_size=32 but the tensors say 16"),
    ({"vit": "ViT-B/32"}, "give one of them"),  # vit and patch_size disagree
    ({"input_text_embed_size": 768}, "text_hidden_size=768"),
    ({"vit": "swin_base_patch4_window7_224_in22k"}, "Swin"),
    ({"num_top_layers": 6}, "unknown key 'num_top_layers'"),
    ({"num_fusion_layers": 2, "num_top_layer": 1}, "give one of them"),
])
def test_meter_config_errors_are_named(changes, needle):
    with pytest.raises(ValueError, match=needle):
        load_official_meter(make_official_state_dict(), meter_config=meter_own_config(**changes))


def test_lightning_hyper_parameters_give_the_head_counts(tmp_path):
    sd = make_official_state_dict()
    path = tmp_path / "meter.ckpt"
    torch.save({"state_dict": sd, "hyper_parameters": {"config": meter_own_config(some_future_key=1)}}, path)
    model = load_official_meter(str(path)).eval()  # no meter_config: the checkpoint's own config is read
    assert (model.config.num_heads, model.config.max_text_len) == (4, 40)
    assert "some_future_key" in model.official_config_report["checkpoint hyper_parameters"]["ignored"]
    ids, mask, pixels = inputs(seed=4)
    with torch.no_grad():
        ours = model.infer(ids, mask, pixel_values=pixels)
        reference = reference_meter_infer(sd, ids, mask, pixels, vit_heads=2, text_heads=1, heads=4)
    torch.testing.assert_close(ours["cls_feats"], reference["cls_feats"], rtol=1e-4, atol=1e-4)
    # an explicit meter_config wins over the checkpoint's
    assert load_official_meter(str(path), {"num_heads": 2, "max_text_len": 30}).config.num_heads == 2


def test_loss_names_without_mlm_allow_the_head_to_be_missing():
    sd = {k: v for k, v in make_official_state_dict().items() if not k.startswith("mlm_score")}
    with pytest.raises(ValueError, match="allow_missing_heads"):
        load_official_meter(sd)
    config = meter_own_config(loss_names={"itm": 0.5, "irtr": 1, "mlm": 0})
    assert load_official_meter(sd, config).config.num_heads == 4


def test_convert_tool_reads_meters_hparams_yaml(official, tmp_path, capsys):
    import yaml

    spec = importlib.util.spec_from_file_location(
        "convert_meter_ckpt", Path(__file__).resolve().parents[1] / "tools" / "convert_meter_ckpt.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    _, path, _ = official
    hparams = tmp_path / "hparams.yaml"  # what Lightning writes beside METER's logs
    hparams.write_text(yaml.safe_dump({"config": meter_own_config()}))
    tool.main(["--src", path, "--out", str(tmp_path / "out"), "--meter-config", str(hparams)])
    out = capsys.readouterr().out
    assert "meter_config: used" in out and "num_top_layer->num_fusion_layers" in out and "learning_rate" in out
    assert METER.from_pretrained(str(tmp_path / "out")).config.num_heads == 4
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(meter_own_config(hidden_sise=768)))
    with pytest.raises(SystemExit, match="unknown key 'hidden_sise'"):
        tool.main(["--src", path, "--out", str(tmp_path / "out2"), "--meter-config", str(bad)])


def test_finetuning_from_an_official_checkpoint_takes_its_architecture(tmp_path):
    """finetune.py --init meter.ckpt: model.* from the file's tensors and hyper_parameters, not METERConfig defaults."""
    from epic.finetune import build_finetune_model, resolve_finetune_config

    path = tmp_path / "meter.ckpt"
    torch.save({"state_dict": make_official_state_dict(), "hyper_parameters": {"config": meter_own_config()}}, path)
    cfg = resolve_finetune_config(None, [f"run.dir={tmp_path / 'run'}", "data.tokenizer=/some/tokenizer"],
                                  "retrieval", str(path))
    model_cfg = cfg.model
    assert (model_cfg.vit_width, model_cfg.hidden_size, model_cfg.num_fusion_layers, model_cfg.num_heads) == (
        W, H, FUSION_LAYERS, 4)
    assert (model_cfg.text_hidden_size, model_cfg.vocab_size, cfg.data.image_size) == (T, VOCAB, IMAGE)
    model = build_finetune_model(cfg)
    reference = load_official_meter(str(path))
    assert torch.equal(model.rank_output.weight, reference.itm_score.fc.weight[1:])
    assert torch.equal(model.cross_modal_text_layers[0].attention.self.query.weight,
                       reference.cross_modal_text_layers[0].attention.self.query.weight)
