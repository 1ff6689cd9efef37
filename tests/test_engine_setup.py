"""Batch arithmetic, DeepSpeed config resolution, parameter groups and LR schedules."""
import math

import pytest
from torch import nn

from epic.engine.schedule import lr_multiplier_fn
from epic.engine.setup import SetupError, build_param_groups, derive_batch_math, resolve_ds_config


def test_batch_math():
    bm = derive_batch_math(4096, 32, 32)
    assert bm.grad_accum_steps == 4 and bm.world_size == 32
    assert derive_batch_math(32, 16, 2).grad_accum_steps == 1


def test_impossible_batch_is_an_error_with_a_fix():
    with pytest.raises(SetupError) as err:
        derive_batch_math(4096, 48, 32)
    msg = str(err.value)
    assert "micro_batch_size (48)" in msg and "world size (32)" in msg and "3072" in msg


def test_ds_config_gets_batch_sizes_and_rejects_contradictions():
    bm = derive_batch_math(64, 8, 2)
    ds = resolve_ds_config({"zero_optimization": {"stage": 2}}, bm, grad_clip=1.0, on_cpu=True)
    assert ds["train_batch_size"] == 64 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_clipping"] == 1.0
    with pytest.raises(SetupError, match="train_batch_size=128"):
        resolve_ds_config({"train_batch_size": 128}, bm, 1.0, True)
    with pytest.raises(SetupError, match="auto"):
        resolve_ds_config({"fp16": {"enabled": "auto"}}, bm, 1.0, False)
    with pytest.raises(SetupError, match="fp16 is not supported"):
        resolve_ds_config({"fp16": {"enabled": True}}, bm, 1.0, True)
    with pytest.raises(SetupError, match="optimizer"):
        resolve_ds_config({"optimizer": {"type": "Adam"}}, bm, 1.0, True)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.text_transformer = nn.Linear(4, 4)
        self.cross_modal_text_layers = nn.ModuleList([nn.Linear(4, 4)])
        self.cross_modal_text_transform = nn.Sequential(nn.Linear(4, 4))
        self.cross_modal_text_transform.LayerNorm = nn.LayerNorm(4)
        self.itm_score = nn.Linear(4, 2)
        self.token_type_embeddings = nn.Embedding(2, 4)

    def param_groups_spec(self):  # the model owns its groups; METER's name rules
        from epic.models.meter import param_groups_spec

        return param_groups_spec(name for name, _ in self.named_parameters())


def test_param_groups_follow_meter():
    groups = build_param_groups(_Toy(), lr=1e-5, weight_decay=0.01, lr_mults={"fusion": 5, "head": 5})
    by_name = {name: g for g in groups for name in g["names"]}
    assert by_name["text_transformer.weight"]["lr"] == 1e-5
    assert by_name["text_transformer.weight"]["weight_decay"] == 0.01
    assert by_name["text_transformer.bias"]["weight_decay"] == 0.0
    assert by_name["cross_modal_text_layers.0.weight"]["lr"] == pytest.approx(5e-5)
    assert by_name["cross_modal_text_transform.LayerNorm.weight"]["weight_decay"] == 0.0
    assert by_name["cross_modal_text_transform.LayerNorm.weight"]["lr"] == pytest.approx(5e-5)
    assert by_name["itm_score.weight"]["lr"] == pytest.approx(5e-5)
    assert by_name["token_type_embeddings.weight"]["lr"] == 1e-5
    assert sum(len(g["names"]) for g in groups) == len(list(_Toy().parameters()))


def test_linear_schedule_shape():
    fn = lr_multiplier_fn("linear", total_steps=100, warmup_ratio=0.1)
    values = [fn(s) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(values[:10], values[1:10]))  # rising warm-up
    assert all(a >= b for a, b in zip(values[10:], values[11:]))  # decaying
    assert values[55] == pytest.approx((100 - 55) / 90)
    assert fn(100) == 0.0


def test_tri_stage_schedule_shape():
    fn = lr_multiplier_fn("tri_stage", total_steps=1000, warmup_ratio=0.1, hold_ratio=0.8, final_scale=0.01)
    assert fn(0) == pytest.approx(1 / 100) and fn(99) == pytest.approx(1.0)
    assert all(fn(s) == 1.0 for s in range(100, 900))
    assert fn(950) == pytest.approx(math.exp(math.log(0.01) * 0.5))
    assert fn(1000) == pytest.approx(0.01)
    assert all(fn(s) > fn(s + 1) for s in range(900, 999))


def test_param_groups_come_from_the_model_and_must_cover_it():
    class Spec(nn.Module):
        def __init__(self, spec):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.LayerNorm(3)
            self.spec = spec

        def param_groups_spec(self):
            return self.spec

    every = {"backbone": {"decay": ["a.weight"], "no_decay": ["a.bias"]}, "head": {"decay": [],
                                                                                   "no_decay": ["b.weight", "b.bias"]}}
    groups = build_param_groups(Spec(every), lr=1.0, weight_decay=0.1, lr_mults={"head": 3.0})
    assert [(g["names"], g["lr"], g["weight_decay"]) for g in groups] == [
        (["a.weight"], 1.0, 0.1), (["a.bias"], 1.0, 0.0), (["b.weight", "b.bias"], 3.0, 0.0)]
    with pytest.raises(SetupError, match="does not place trainable 'b.bias'"):
        build_param_groups(Spec({"backbone": {"decay": ["a.weight", "a.bias", "b.weight"]}}), 1.0, 0.1)
    with pytest.raises(SetupError, match="names group 'towers'"):
        build_param_groups(Spec({"towers": {"decay": ["a.weight"]}}), 1.0, 0.1)
    plain = build_param_groups(nn.Sequential(nn.Linear(2, 2)), lr=1.0, weight_decay=0.1)  # no spec: ndim rule
    assert [g["names"] for g in plain] == [["0.weight"], ["0.bias"]]


def test_every_engine_gets_the_same_fp16_on_cpu_rule():
    from epic.engine.setup import EngineSpec, engine_ds_config, optimizer_spec
    from epic.config import load_config

    batch = derive_batch_math(16, 4, 2)
    vlm = resolve_ds_config({"zero_optimization": {"stage": 2}}, batch, 1.0, on_cpu=True)
    train = load_config("shapes_tiny").train
    generator = EngineSpec(nn.Linear(2, 2), optimizer_spec(train), ds_config="ds_configs/generator_fp16.json")
    with pytest.raises(SetupError, match="fp16 is not supported by DeepSpeed on CPU"):
        engine_ds_config(generator, vlm, batch, 1.0, on_cpu=True)
    with pytest.raises(SetupError, match="fp16 is not supported by DeepSpeed on CPU"):
        resolve_ds_config({"fp16": {"enabled": True}}, batch, 1.0, on_cpu=True)
    assert engine_ds_config(generator, vlm, batch, 1.0, on_cpu=False)["fp16"]["enabled"]
    frozen = engine_ds_config(EngineSpec(nn.Linear(2, 2), None), vlm, batch, 1.0, on_cpu=True)
    assert frozen["zero_optimization"]["stage"] == 0 and frozen["gradient_accumulation_steps"] == 2

