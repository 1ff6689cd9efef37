"""METER building blocks against straightforward references: fusion layer, CLIP weight loading, saliency q/k."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from epic.models.configuration_meter import METERConfig
from epic.models.fusion import BertCrossLayer, additive_attention_mask
from epic.models.meter import METER, param_groups_spec


def tiny_config(**overrides) -> METERConfig:
    values = dict(image_size=32, patch_size=16, vit_width=32, vit_layers=2, vit_heads=2, vocab_size=60,
                  text_hidden_size=24, text_layers=2, text_heads=2, text_intermediate_size=48,
                  text_max_position_embeddings=16, max_text_len=8, hidden_size=32, num_heads=4,
                  num_fusion_layers=3, dropout=0.0)
    values.update(overrides)
    return METERConfig(**values)


def randomize_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Non-trivial values everywhere (LayerNorm weights ≠ 1, biases ≠ 0) so a mix-up cannot cancel out."""
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2 + (0.5 if param.dim() == 1 else 0.0))


def text_batch(generator: torch.Generator, batch: int = 3, length: int = 8, vocab: int = 60):
    ids = torch.randint(3, vocab, (batch, length), generator=generator)
    ids[:, 0] = 0
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 5:] = 0  # one padded caption
    ids[1, 5:] = 1
    return ids, mask


# --------------------------------------------------------------------------------------- fusion layer reference
def layer_norm_by_hand(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def attention_by_hand(x, context, context_mask, q, k, v, heads):
    """softmax(Q Kᵀ / √d + mask) V, written out; mask [B, Lk] with 1 = real token."""
    b, lq, h = x.shape
    d = h // heads
    query = (x @ q.weight.T + q.bias).view(b, lq, heads, d).permute(0, 2, 1, 3)
    key = (context @ k.weight.T + k.bias).view(b, -1, heads, d).permute(0, 2, 1, 3)
    value = (context @ v.weight.T + v.bias).view(b, -1, heads, d).permute(0, 2, 1, 3)
    scores = query @ key.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(context_mask[:, None, None, :] == 0, float("-inf"))
    probs = torch.exp(scores - scores.amax(-1, keepdim=True))
    probs = probs / probs.sum(-1, keepdim=True)
    return (probs @ value).permute(0, 2, 1, 3).reshape(b, lq, h)


def cross_layer_by_hand(layer, x, other, x_mask, other_mask, heads, eps):
    def block(attention, hidden, context, context_mask):
        out = attention_by_hand(hidden, context, context_mask, attention.self.query, attention.self.key,
                                attention.self.value, heads)
        dense, ln = attention.output.dense, attention.output.LayerNorm
        return layer_norm_by_hand(out @ dense.weight.T + dense.bias + hidden, ln.weight, ln.bias, eps)

    h = block(layer.attention, x, x, x_mask)
    h = block(layer.crossattention, h, other, other_mask)
    inner = h @ layer.intermediate.dense.weight.T + layer.intermediate.dense.bias
    inner = 0.5 * inner * (1 + torch.erf(inner / math.sqrt(2)))  # exact GELU
    out = inner @ layer.output.dense.weight.T + layer.output.dense.bias
    return layer_norm_by_hand(out + h, layer.output.LayerNorm.weight, layer.output.LayerNorm.bias, eps)


def test_fusion_layer_matches_straightforward_implementation():
    g = torch.Generator().manual_seed(0)
    cfg = tiny_config()
    layer = BertCrossLayer(cfg).eval()
    randomize_(layer, g)
    x = torch.randn(3, 7, cfg.hidden_size, generator=g)
    other = torch.randn(3, 5, cfg.hidden_size, generator=g)
    x_mask = torch.ones(3, 7, dtype=torch.long)
    x_mask[0, 4:] = 0
    other_mask = torch.ones(3, 5, dtype=torch.long)
    other_mask[2, 2:] = 0
    ours, _ = layer(x, other, additive_attention_mask(x_mask, x.dtype), additive_attention_mask(other_mask, x.dtype))
    reference = cross_layer_by_hand(layer, x, other, x_mask, other_mask, cfg.num_heads, cfg.layer_norm_eps)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    # the other stream's padding is invisible: change it and nothing moves
    other_changed = other.clone()
    other_changed[2, 2:] += 5.0
    again, _ = layer(x, other_changed, additive_attention_mask(x_mask, x.dtype),
                     additive_attention_mask(other_mask, x.dtype))
    torch.testing.assert_close(again, ours, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------- vision tower
def synthetic_clip_state_dict(width, blocks, grid, patch, generator, embed_dim=16):
    """OpenAI-CLIP layout, visual tower plus a few text-tower keys that must be ignored."""
    def r(*shape):
        return torch.randn(*shape, generator=generator) * 0.1

    sd = {"visual.class_embedding": r(width), "visual.positional_embedding": r(grid * grid + 1, width),
          "visual.conv1.weight": r(width, 3, patch, patch), "visual.ln_pre.weight": 1 + r(width),
          "visual.ln_pre.bias": r(width), "visual.ln_post.weight": 1 + r(width), "visual.ln_post.bias": r(width),
          "visual.proj": r(width, embed_dim), "positional_embedding": r(77, embed_dim),
          "token_embedding.weight": r(100, embed_dim), "logit_scale": torch.tensor(4.6)}
    for i in range(blocks):
        p = f"visual.transformer.resblocks.{i}."
        sd.update({p + "attn.in_proj_weight": r(3 * width, width), p + "attn.in_proj_bias": r(3 * width),
                   p + "attn.out_proj.weight": r(width, width), p + "attn.out_proj.bias": r(width),
                   p + "ln_1.weight": 1 + r(width), p + "ln_1.bias": r(width), p + "ln_2.weight": 1 + r(width),
                   p + "ln_2.bias": r(width), p + "mlp.c_fc.weight": r(4 * width, width),
                   p + "mlp.c_fc.bias": r(4 * width), p + "mlp.c_proj.weight": r(width, 4 * width),
                   p + "mlp.c_proj.bias": r(width)})
    return sd


def test_vision_tower_loads_openai_clip_file_at_a_new_resolution(tmp_path):
    g = torch.Generator().manual_seed(1)
    width, patch = 32, 16
    clip = synthetic_clip_state_dict(width, blocks=3, grid=2, patch=patch, generator=g)  # a "224" model: grid 2
    path = tmp_path / "clip.pt"
    torch.save(clip, path)
    cfg = tiny_config(image_size=48, vit_width=width, vit_layers=2, vit_pretrained=str(path))  # grid 3, 2 of 3 blocks
    vit = METER(cfg).vit_model

    assert len(vit.blocks) == 2  # the file's last block is dropped, as METER drops CLIP's 12th
    torch.testing.assert_close(vit.blocks[1].attn.qkv.weight, clip["visual.transformer.resblocks.1.attn.in_proj_weight"])
    torch.testing.assert_close(vit.blocks[0].mlp.fc2.bias, clip["visual.transformer.resblocks.0.mlp.c_proj.bias"])
    torch.testing.assert_close(vit.patch_embed.proj.weight, clip["visual.conv1.weight"])
    assert vit.patch_embed.proj.bias is None  # CLIP's conv1 has no bias
    torch.testing.assert_close(vit.norm.weight, clip["visual.ln_post.weight"])
    torch.testing.assert_close(vit.cls_token.flatten(), clip["visual.class_embedding"])
    # position embedding: class slot kept, the 2x2 grid resized bicubically to 3x3 (METER's adapt_position_encoding)
    old = clip["visual.positional_embedding"]
    grid = old[1:].reshape(2, 2, width).permute(2, 0, 1)[None]
    expected = F.interpolate(grid, size=(3, 3), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).reshape(9, width)
    torch.testing.assert_close(vit.pos_embed[0, 0], old[0])
    torch.testing.assert_close(vit.pos_embed[0, 1:], expected, rtol=1e-5, atol=1e-6)

    out = METER(cfg).encode_image(torch.randn(2, 3, 48, 48, generator=g))
    assert out.shape == (2, 10, width)
    # ln_post (timm's final norm) is applied to every token: each token has the norm's mean/var signature
    normed = (out - vit.norm.bias) / vit.norm.weight
    torch.testing.assert_close(normed.mean(-1), torch.zeros(2, 10), atol=1e-4, rtol=0)


def test_vision_tower_rejects_a_too_shallow_clip_file(tmp_path):
    g = torch.Generator().manual_seed(2)
    torch.save(synthetic_clip_state_dict(32, blocks=1, grid=2, patch=16, generator=g), tmp_path / "clip.pt")
    with pytest.raises(ValueError, match="vit_layers=2"):
        METER(tiny_config(vit_pretrained=str(tmp_path / "clip.pt")))


def test_text_tower_from_a_local_pretrained_folder(tmp_path):
    reference = METER(tiny_config()).text_transformer
    reference.save_pretrained(tmp_path / "roberta")
    loaded = METER(tiny_config(text_pretrained=str(tmp_path / "roberta"))).text_transformer
    for (name, a), (_, b) in zip(reference.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    with pytest.raises(ValueError, match="vocab_size"):
        METER(tiny_config(vocab_size=61, text_pretrained=str(tmp_path / "roberta")))


# --------------------------------------------------------------------------------------- infer API
def test_infer_with_image_embeds_never_runs_the_vision_tower():
    g = torch.Generator().manual_seed(3)
    model = METER(tiny_config()).eval()
    ids, mask = text_batch(g)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    from_pixels = model.infer(ids, mask, pixel_values=pixels)
    embeds = model.encode_image(pixels)

    def forbidden(*args, **kwargs):
        raise AssertionError("the vision tower ran although image_embeds were given")

    model.vit_model.forward_features = forbidden
    model.encode_image = forbidden
    from_embeds = model.infer(ids, mask, image_embeds=embeds)
    for key in ("text_feats", "image_feats", "cls_feats"):
        torch.testing.assert_close(from_embeds[key], from_pixels[key])
    assert from_embeds["cls_feats"].shape == (3, 2 * model.config.hidden_size)
    with pytest.raises(ValueError, match="pixel_values or image_embeds"):
        model.infer(ids, mask)


def test_saliency_query_and_keys_equal_a_hand_computation():
    g = torch.Generator().manual_seed(4)
    cfg = tiny_config()
    model = METER(cfg).eval()
    randomize_(model.cross_modal_image_layers, g)
    ids, mask = text_batch(g)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    penultimate = cfg.num_fusion_layers - 2
    layer = model.cross_modal_image_layers[penultimate]
    seen = {}
    layer.register_forward_pre_hook(lambda mod, args: seen.update(image=args[0], text=args[1]))
    layer.attention.register_forward_hook(lambda mod, args, out: seen.update(self_attended=out[0]))
    out = model.infer(ids, mask, pixel_values=pixels, return_saliency_qk=True)

    heads, dh = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    query_proj, key_proj = layer.crossattention.self.query, layer.crossattention.self.key
    query = (seen["self_attended"][:, 0] @ query_proj.weight.T + query_proj.bias).view(3, heads, dh)
    keys = (seen["text"] @ key_proj.weight.T + key_proj.bias).view(3, -1, heads, dh).transpose(1, 2)
    assert out["saliency_query"].shape == (3, heads, dh) and out["saliency_keys"].shape == (3, heads, 8, dh)
    torch.testing.assert_close(out["saliency_query"], query, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["saliency_keys"], keys, rtol=1e-5, atol=1e-6)
    assert seen["text"].shape[1] == 8 and seen["image"].shape[1] == 5  # keys from the text stream, query image [CLS]

    # the teacher path stops before the last layer and gives the same numbers
    def forbidden(*args, **kwargs):
        raise AssertionError("the last fusion layer ran")

    model.cross_modal_image_layers[-1].forward = forbidden
    model.cross_modal_text_layers[-1].forward = forbidden
    model.cross_modal_text_layers[penultimate].forward = forbidden
    teacher = model.infer(ids, mask, pixel_values=pixels, return_saliency_qk=True, stop_before_last_layer=True)
    torch.testing.assert_close(teacher["saliency_query"], out["saliency_query"])
    torch.testing.assert_close(teacher["saliency_keys"], out["saliency_keys"])
    assert "cls_feats" not in teacher


def test_param_groups_spec_separates_fusion_heads_backbone_and_no_decay():
    names = [n for n, _ in METER(tiny_config()).named_parameters()]
    spec = param_groups_spec(names)
    assert sorted(sum((v["decay"] + v["no_decay"] for v in spec.values()), [])) == sorted(names)
    assert "cross_modal_text_layers.0.attention.self.query.weight" in spec["fusion"]["decay"]
    assert "cross_modal_image_pooler.dense.bias" in spec["fusion"]["no_decay"]
    assert "mlm_score.decoder.weight" in spec["head"]["decay"] and "mlm_score.bias" in spec["head"]["no_decay"]
    assert "itm_score.fc.weight" in spec["head"]["decay"]
    assert "mlm_score.transform.LayerNorm.weight" in spec["head"]["no_decay"]
    for name in ("vit_model.norm_pre.weight", "vit_model.blocks.0.norm1.weight", "vit_model.norm.weight",
                 "text_transformer.embeddings.LayerNorm.weight", "vit_model.blocks.1.attn.qkv.bias"):
        assert name in spec["backbone"]["no_decay"], name
    for name in ("vit_model.pos_embed", "token_type_embeddings.weight",
                 "text_transformer.embeddings.word_embeddings.weight", "vit_model.blocks.0.mlp.fc1.weight"):
        assert name in spec["backbone"]["decay"], name


def test_save_and_load_pretrained_round_trip(tmp_path):
    g = torch.Generator().manual_seed(5)
    model = METER(tiny_config()).eval()
    model.save_pretrained(str(tmp_path / "m"))
    loaded = METER.from_pretrained(str(tmp_path / "m")).eval()
    assert loaded.config == dataclasses.replace(model.config)
    ids, mask = text_batch(g)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    torch.testing.assert_close(loaded.infer(ids, mask, pixels)["cls_feats"], model.infer(ids, mask, pixels)["cls_feats"])


def test_from_pretrained_restores_the_epic_consistency_head(tmp_path):
    from epic.objectives.consistency import add_consistency_head

    model = add_consistency_head(METER(tiny_config()))
    model.save_pretrained(str(tmp_path / "epic"))
    loaded = METER.from_pretrained(str(tmp_path / "epic"))
    torch.testing.assert_close(loaded.itc_score.weight, model.itc_score.weight, rtol=0, atol=0)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_text_tower_with_prepared_mask_equals_hf_with_its_own_mask(implementation):
    from epic.models.text import encode_text_tokens

    g = torch.Generator().manual_seed(6)
    tower = METER(tiny_config()).text_transformer.eval()
    tower.set_attn_implementation(implementation)
    assert tower.config._attn_implementation == implementation
    ids, mask = text_batch(g)
    ours = encode_text_tokens(tower, ids, mask)
    theirs = tower(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    unmasked = tower(input_ids=ids).last_hidden_state  # the padding mask does matter for the padded caption
    assert not torch.allclose(ours[1, :5], unmasked[1, :5], atol=1e-4)


def test_initializer_range_sets_every_random_init():
    """One std for the vision tower (timm), the text tower (HF), the fusion layers and the heads."""
    torch.manual_seed(0)
    model = METER(tiny_config(initializer_range=0.1, vit_width=64, text_hidden_size=64, hidden_size=64))
    weights = {"vision qkv": model.vit_model.blocks[0].attn.qkv.weight,
               "vision mlp": model.vit_model.blocks[1].mlp.fc2.weight,
               "text query": model.text_transformer.encoder.layer[0].attention.self.query.weight,
               "text embeddings": model.text_transformer.embeddings.word_embeddings.weight,
               "fusion value": model.cross_modal_text_layers[0].crossattention.self.value.weight,
               "itm head": model.itm_score.fc.weight}
    for name, weight in weights.items():
        assert weight.std().item() == pytest.approx(0.1, rel=0.15), name
    assert model.cross_modal_image_layers[0].output.dense.bias.abs().max() == 0


def solid_colour_batch(generator: torch.Generator, batch: int, colours: torch.Tensor, image_size: int):
    """Images of one colour each (+ noise) and captions [<s>, colour word, </s>] naming it."""
    index = torch.randint(0, len(colours), (batch,), generator=generator)
    noise = torch.randn(batch, 3, image_size, image_size, generator=generator)
    pixels = colours[index][:, :, None, None] + 0.1 * noise
    input_ids = torch.stack([torch.zeros_like(index), 5 + index, torch.full_like(index, 2)], dim=1)
    return {"pixel_values": pixels, "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def test_tiny_model_learns_image_text_matching():
    """The tiny from-scratch configs (initializer_range 0.08, no x5 lr multipliers) must be able to ground words in
    images: with METER's 0.02 at width 64, ITM sat at chance (loss ln 2) for hundreds of steps even here."""
    from epic.objectives.itm import compute_itm

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = METER(tiny_config(image_size=32, vit_width=64, text_hidden_size=64, text_intermediate_size=128,
                              hidden_size=64, num_heads=2, num_fusion_layers=2, initializer_range=0.08))
    colours = torch.randn(8, 3, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    for _ in range(300):
        batch = solid_colour_batch(generator, 32, colours, 32)
        loss = compute_itm(model, batch, model.encode_image(batch["pixel_values"]), generator)["loss_itm"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        batch = solid_colour_batch(generator, 256, colours, 32)
        held_out = compute_itm(model, batch, model.encode_image(batch["pixel_values"]), generator)
    assert held_out["itm_acc"] > 0.8 and held_out["loss_itm"] < 0.45, held_out
