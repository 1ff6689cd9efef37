"""Interface conformance of every registered model family (epic/models/registry.py): a tiny model of each, built
from its packaged tiny config, offers every VLPModel method with the documented shapes and laws. A family that
registers later is tested here without editing this file."""
import dataclasses

import pytest
import torch

from epic.config import load_config
from epic.engine.setup import LR_GROUPS, build_param_groups
from epic.models.interface import CONSISTENCY_HEAD, INFER_KEYS, VLPModel
from epic.models.registry import FAMILIES, build_model, config_class, model_class

VOCAB, PAD, BATCH = 61, 1, 3


def tiny_config(family: str, **changes):
    entry = FAMILIES[family]
    assert entry.tiny_config, f"registry entry {family!r} names no tiny_config (a packaged run config)"
    model_cfg = load_config(entry.tiny_config).model
    assert type(model_cfg) is config_class(family) and model_cfg.family == family
    return dataclasses.replace(model_cfg, vocab_size=VOCAB, pad_token_id=PAD, **changes)


def tiny_batch(cfg, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    length = min(cfg.max_text_len, 12)
    ids = torch.randint(4, VOCAB, (BATCH, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, length // 2:] = 0  # one caption with padding
    ids[mask == 0] = PAD
    pixels = torch.randn(BATCH, 3, cfg.image_size, cfg.image_size, generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def built(family):
    torch.manual_seed(0)
    cfg = tiny_config(family)
    return cfg, build_model(cfg).eval(), tiny_batch(cfg)


def test_registry_builds_the_family_class(family, built):
    cfg, model, _ = built
    assert isinstance(model, VLPModel) and type(model) is model_class(family) and model.family == family
    for name in ("hidden_size", "vocab_size", "pad_token_id", "image_size", "max_text_len", "consistency_head",
                 "initializer_range"):
        assert hasattr(model.config, name), f"{family} config lacks {name!r} (docs/CONTRACTS.md)"
    assert load_config(FAMILIES[family].tiny_config, [f"model.family={family}"]).model.family == family


def test_infer_heads_and_shapes(built):
    cfg, model, batch = built
    stream = torch.Generator().manual_seed(5)
    before = stream.get_state()
    with torch.no_grad():
        image_embeds = model.encode_image(batch["pixel_values"])
        seeded = model.encode_image(batch["pixel_values"], generator=stream)
        out = model.infer(batch["input_ids"], batch["attention_mask"], image_embeds=image_embeds)
        again = model.infer(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"])
    assert torch.equal(stream.get_state(), before), "encode_image drew from the generator in eval mode"
    torch.testing.assert_close(seeded, image_embeds, rtol=0, atol=0)
    assert set(INFER_KEYS) <= set(out)
    length = batch["input_ids"].shape[1]
    assert out["text_feats"].shape == (BATCH, length, cfg.hidden_size)
    assert out["image_feats"].shape[0] == BATCH and out["image_feats"].dim() == 3
    assert out["cls_feats"].shape[0] == BATCH and out["cls_feats"].dim() == 2
    for key in INFER_KEYS:  # encode_image once and pass it on == let infer run the vision encoder
        torch.testing.assert_close(out[key], again[key], rtol=0, atol=0)
    with torch.no_grad():
        assert model.itm_score(out["cls_feats"]).shape == (BATCH, 2)
        logits = model.mlm_score(out["text_feats"])
        assert logits.shape == (BATCH, length, cfg.vocab_size)
        weight, bias = model.mlm_output_embedding()
        manual = model.mlm_transform(out["text_feats"]) @ weight.T + (0 if bias is None else bias)
    assert weight.shape == (cfg.vocab_size, model.mlm_transform(out["text_feats"]).shape[-1])
    torch.testing.assert_close(logits, manual, rtol=1e-5, atol=1e-5)


def test_consistency_head_is_switched_on_by_the_config_and_created_last(family, built):
    cfg, plain, _ = built
    assert plain.consistency_head() is None
    torch.manual_seed(0)
    with_head = build_model(dataclasses.replace(cfg, consistency_head=True))
    head = with_head.consistency_head()
    assert isinstance(head, torch.nn.Linear) and head.weight.shape == (1, cfg.hidden_size)
    assert getattr(with_head, CONSISTENCY_HEAD) is head
    # every other weight is drawn exactly as without the head (so METER's recorded losses did not move)
    others = {k: v for k, v in with_head.state_dict().items() if not k.startswith(CONSISTENCY_HEAD + ".")}
    assert others.keys() == plain.state_dict().keys()
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(others[name], value, rtol=0, atol=0, msg=name)


def test_save_and_from_pretrained_round_trip(family, built, tmp_path):
    cfg, model, batch = built
    torch.manual_seed(1)
    with_head = build_model(dataclasses.replace(cfg, consistency_head=True)).eval()
    for name, source in (("plain", model), ("head", with_head)):
        source.save_pretrained(str(tmp_path / name))
        loaded = model_class(family).from_pretrained(str(tmp_path / name)).eval()
        assert type(loaded) is type(source) and loaded.config == source.config
        assert loaded.state_dict().keys() == source.state_dict().keys()
        for key, value in source.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=key)
        with torch.no_grad():
            a = source.infer(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"])
            b = loaded.infer(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"])
        torch.testing.assert_close(a["cls_feats"], b["cls_feats"], rtol=0, atol=0)


def test_from_pretrained_names_the_missing_file(family, built, tmp_path):
    import os

    _, model, _ = built
    model.save_pretrained(str(tmp_path))
    for name in ("model.safetensors", "config.json"):
        os.rename(tmp_path / name, tmp_path / (name + ".moved"))
        with pytest.raises(FileNotFoundError, match=name.replace(".", r"\.")):
            model_class(family).from_pretrained(str(tmp_path))
        os.rename(tmp_path / (name + ".moved"), tmp_path / name)


def test_saliency_qk_and_the_frozen_pruned_teacher(built):
    cfg, model, batch = built
    with torch.no_grad():
        query, keys = model.saliency_qk(batch["input_ids"], batch["attention_mask"],
                                        pixel_values=batch["pixel_values"])
    length = batch["input_ids"].shape[1]
    assert query.dim() == 3 and query.shape[0] == BATCH
    assert keys.shape == (BATCH, query.shape[1], length, query.shape[2])
    teacher = model.saliency_teacher()
    assert teacher is not model and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in model.parameters()), "the copy must not freeze the model itself"
    assert sum(p.numel() for p in teacher.parameters()) <= sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        t_query, t_keys = teacher.saliency_qk(batch["input_ids"], batch["attention_mask"],
                                              pixel_values=batch["pixel_values"])
    torch.testing.assert_close(t_query, query, rtol=0, atol=0)
    torch.testing.assert_close(t_keys, keys, rtol=0, atol=0)


def test_param_groups_spec_places_every_trainable_parameter_once(built):
    _, model, _ = built
    spec = model.param_groups_spec()
    assert set(spec) <= set(LR_GROUPS)
    listed = [name for kinds in spec.values() for kind, names in kinds.items() for name in names]
    assert all(kind in ("decay", "no_decay") for kinds in spec.values() for kind in kinds)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert sorted(listed) == sorted(trainable)
    groups = build_param_groups(model, lr=1.0, weight_decay=0.1, lr_mults={"fusion": 2.0, "head": 3.0})
    assert sum(len(g["params"]) for g in groups) == len(trainable)


def test_official_converter_is_importable(family):
    from epic.models.registry import _import

    assert callable(_import(FAMILIES[family].converter))
