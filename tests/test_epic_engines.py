"""The EPIC step with real DeepSpeed engines (one CPU rank, gloo, in this process): every ablation switch runs a
step, the teacher gets no gradient and never changes, an overflow in one engine leaves the other's step identical,
the teacher and a fixed generator load from a checkpoint written by the trainer's save_checkpoint."""
import os

import pytest
import torch
from inprocess import build_engine, export_teacher_and_eval_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 4


@pytest.fixture(scope="module")
def setup(shapes_world, tmp_path_factory, gloo_rank):
    """Resolved paths, a tokenizer, a teacher export dir and one eval batch of the shapes world."""
    tmp = tmp_path_factory.mktemp("epic_engines")
    paths, tokenizer, batch = export_teacher_and_eval_batch(make_config(shapes_world, tmp / "teacher"),
                                                            tmp / "teacher", BATCH)
    return {"world": shapes_world, "tmp": tmp, "paths": paths, "tokenizer": tokenizer, "batch": batch}


def make_config(world, teacher, *overrides):
    from epic.config import load_config

    return load_config("epic_shapes_tiny", [f"data.root={world}", f"epic.teacher={teacher}",
                                            f"data.micro_batch_size={BATCH}", f"train.global_batch_size={BATCH}",
                                            "model.dropout=0.0", "train.max_steps=10", "epic.generator.lr=1e-3",
                                            *overrides])


def build(setup, *overrides, paths=None, accum=1):
    """The trainer's construction (epic/engine/trainer.py Trainer.setup) for one rank: VLM engine + objective
    (``accum`` micro-batches of BATCH per optimizer step)."""
    cfg = make_config(setup["world"], setup["tmp"] / "teacher", *overrides)
    engine, objective = build_engine(cfg, paths or setup["paths"], BATCH, accum)
    return cfg, engine, objective


def train_step(engine, objective, batch, step, seed=0, poison_vlm=False):
    """One micro-batch = one optimizer step, as Trainer._micro_step does it (the objective steps the generator)."""
    torch.manual_seed(1000 + step)
    out = objective.losses(engine.module, batch, torch.Generator().manual_seed(seed + step), step)
    loss = out["loss"] * float("inf") if poison_vlm else out["loss"]
    engine.backward(loss)
    engine.step()
    return out


def weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


ABLATIONS = {
    "epic": [],
    "itc_rand": ["epic.corruption=random", "epic.masking=uniform"],
    "itc_lm": ["epic.masking=uniform"],
    "lm_fixed": ["epic.generator_mode=fixed"],
    "lm_cond": ["epic.generator_mode=conditioned"],
    "vlm_sas": ["epic.generator_mode=vlm_sas", "epic.sas_refresh_every=1"],
    "cmlm": ["data.mlm_masking=saliency"],
    "ratio_lambda": ["epic.mask_ratio=0.15", "epic.lambda_itc=1.0"],
    "itc_pair_sum": ["epic.itc_reduction=pair_sum", "epic.lambda_itc=0.25"],
}


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_every_ablation_switch_runs_a_step(setup, name):
    cfg, engine, objective = build(setup, *ABLATIONS[name])
    trained_generator = cfg.epic.corruption == "generator" and cfg.epic.generator_mode in ("finetune", "conditioned")
    assert set(objective.extra_engines()) == ({"generator"} if trained_generator or name == "vlm_sas" else set())
    vlm_before = weights(engine.module)
    gen_before = weights(objective.generator) if objective.generator is not None else None
    outs = [train_step(engine, objective, setup["batch"], 0)]
    vlm_after_first = weights(engine.module)
    outs.append(train_step(engine, objective, setup["batch"], 1))
    for out in outs:
        assert all(torch.isfinite(v).all() for v in out.values()), out
        expected = (out["loss_itm"] + out["loss_mlm"] + cfg.epic.lambda_itc * out["loss_itc"]).item()
        assert out["loss"].item() == pytest.approx(expected, rel=1e-5)  # Eq. 9 without L_GEN
    assert ("loss_gen" in outs[0]) == (cfg.epic.corruption == "generator")
    assert not same(vlm_before, weights(engine.module))
    if gen_before is not None:
        changed = not same(gen_before, weights(objective.generator))
        # trained generators learn; fixed ones never change; VLM(SAS) follows the VLM at each refresh
        assert changed == (trained_generator or name == "vlm_sas")
    if name == "vlm_sas":  # a copy of the VLM, refreshed at step 1 with the VLM's weights after its first update
        sas = weights(objective.generator)
        assert same(sas, {k: vlm_after_first[k] for k in sas})
    values = objective.log_values(2)
    assert 0.0 <= values["epic/inconsistent_token_ratio"] <= cfg.epic.mask_ratio + 0.2
    assert values["epic/content_hit_rate"] >= 0.0 and "epic/content_hit_rate_uniform" in values
    if name == "itc_rand":  # uniform tokens from a ~few-hundred-token vocabulary are almost never the original
        assert values["epic/gen_acc_masked"] < 0.1


def test_pretrained_fixed_generator_and_teacher_from_a_trainer_checkpoint(setup):
    from epic.config import config_to_dict
    from epic.engine.checkpoint import save_checkpoint
    from epic.models.generator import build_generator
    from epic.models.teacher import load_teacher

    cfg, engine, objective = build(setup)
    train_step(engine, objective, setup["batch"], 0)
    engines = {"vlm": engine, **objective.extra_engines()}
    run = setup["tmp"] / "ckpt_run"
    save_checkpoint(run / "checkpoints", 1, engines, {"objective": objective.state_dict()},
                    {"step": 1, "world_size": 1, "config": config_to_dict(cfg)}, keep_last=1)
    teacher = load_teacher(str(run), "cpu")
    vlm = engine.module.state_dict()
    for name, value in teacher.vlm.state_dict().items():
        assert torch.equal(value, vlm[name].float()), name
    generator = build_generator(cfg.epic.generator, cfg.model, pretrained=str(run))
    assert same(weights(generator), weights(objective.generator))
    _, engine2, fixed = build(setup, "epic.generator_mode=pretrained_fixed", f"epic.generator.pretrained={run}")
    assert fixed.extra_engines() == {} and same(weights(fixed.generator), weights(objective.generator))
    train_step(engine2, fixed, setup["batch"], 0)


def test_vlm_sas_generator_is_saved_and_restored_with_the_checkpoint(setup):
    from epic.config import config_to_dict
    from epic.engine.checkpoint import load_checkpoint, save_checkpoint

    sas = ["epic.generator_mode=vlm_sas", "epic.sas_refresh_every=1"]
    cfg, engine, objective = build(setup, *sas)
    for step in range(2):
        train_step(engine, objective, setup["batch"], step)
    root = setup["tmp"] / "sas_run" / "checkpoints"
    save_checkpoint(root, 2, {"vlm": engine, **objective.extra_engines()}, {"objective": objective.state_dict()},
                    {"step": 2, "world_size": 1, "config": config_to_dict(cfg)}, keep_last=1)
    _, engine2, restored = build(setup, *sas)
    assert not same(weights(restored.generator), weights(objective.generator))  # fresh: a copy of the new VLM
    load_checkpoint(root / "step_00000002", {"vlm": engine2, **restored.extra_engines()}, world_size=1)
    assert same(weights(restored.generator), weights(objective.generator))  # the VLM of the last refresh


def test_sas_refresh_schedule_by_epochs_and_by_steps():
    from epic.objectives.consistency import sas_refresh_due

    # 4 samples per step, epochs of 10 samples: epochs end inside steps 2, 4, 7, 9 (samples 8-12, 16-20, 28-32, 36-40)
    by_epoch = [s for s in range(12) if sas_refresh_due(s, 0, 1, 4, 10)]
    assert by_epoch == [3, 5, 8, 10]
    assert [s for s in range(12) if sas_refresh_due(s, 0, 2, 4, 10)] == [5, 10]  # every 2nd epoch
    assert [s for s in range(12) if sas_refresh_due(s, 3, 1, 4, 10)] == [3, 6, 9]  # by steps: epochs ignored


def test_vlm_sas_refreshes_at_the_epoch_boundary(setup):
    """Epochs of 10 samples, 4 per step: the first epoch ends during step 2, so the auxiliary VLM is the initial
    VLM through step 2 and becomes the VLM after step 2's update at the start of step 3."""
    import dataclasses

    from epic.engine.setup import SetupError

    paths = dataclasses.replace(setup["paths"], epoch_samples=10)
    _, engine, objective = build(setup, "epic.generator_mode=vlm_sas", "epic.sas_refresh_epochs=1", paths=paths)
    initial = weights(objective.generator)
    vlm_after = []
    for step in range(4):
        train_step(engine, objective, setup["batch"], step)
        vlm_after.append(weights(engine.module))
        if step < 3:
            assert same(initial, weights(objective.generator)), step
    sas = weights(objective.generator)
    assert objective.sas_refreshes == [3] and same(sas, {k: vlm_after[2][k] for k in sas})
    with pytest.raises(SetupError, match="count_shards"):
        build(setup, "epic.generator_mode=vlm_sas", paths=dataclasses.replace(setup["paths"], epoch_samples=None))


def test_teacher_gets_no_gradient_and_never_changes(setup):
    _, engine, objective = build(setup)
    teacher = objective.teacher
    before = weights(teacher)
    teacher_ids = {id(p) for p in teacher.parameters()}
    for eng in (engine, objective.gen_engine):
        in_optimizer = {id(p) for group in eng.optimizer.optimizer.param_groups for p in group["params"]}
        assert not in_optimizer & teacher_ids
    assert not any(p is q for p in teacher.parameters() for q in engine.module.parameters())
    for step in range(2):
        train_step(engine, objective, setup["batch"], step)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert same(before, weights(teacher)) and not teacher.training


@pytest.mark.parametrize("poisoned", ["generator", "vlm"])
def test_an_overflow_in_one_engine_never_changes_the_others_step(setup, poisoned, monkeypatch):
    import epic.objectives.consistency as consistency

    _, engine_a, clean = build(setup)
    _, engine_b, other = build(setup)
    assert same(weights(engine_a.module), weights(engine_b.module))
    assert same(weights(clean.generator), weights(other.generator))
    gen_start, vlm_start = weights(other.generator), weights(engine_b.module)

    train_step(engine_a, clean, setup["batch"], 0)
    if poisoned == "generator":  # an inf in L_GEN, hence in every generator gradient
        real = consistency.sample_replacements
        monkeypatch.setattr(consistency, "sample_replacements",
                            lambda *a, **k: (lambda s, l: (s, l * float("inf")))(*real(*a, **k)))
    train_step(engine_b, other, setup["batch"], 0, poison_vlm=poisoned == "vlm")

    if poisoned == "generator":
        assert other.gen_engine.skipped_steps == 1 and engine_b.skipped_steps == 0
        assert same(gen_start, weights(other.generator))  # the generator's step was skipped ...
        assert same(weights(engine_a.module), weights(engine_b.module))  # ... the VLM's is exactly the clean one
    else:
        assert engine_b.skipped_steps == 1 and other.gen_engine.skipped_steps == 0
        assert same(vlm_start, weights(engine_b.module))
        assert same(weights(clean.generator), weights(other.generator))
    assert not same(gen_start, weights(clean.generator)) and not same(vlm_start, weights(engine_a.module))


def test_saliency_figure_and_resume_state(setup):
    _, engine, objective = build(setup, "epic.log_saliency_every=2")
    train_step(engine, objective, setup["batch"], 0)
    assert objective.images(1) == {}
    image = objective.images(2)["epic/saliency"]
    assert image.dtype.name == "uint8" and image.ndim == 3 and image.shape[2] == 3 and image.shape[0] > 100
    assert objective.images(3) == {}  # once per log_saliency_every steps
    state = objective.state_dict()
    _, _, restored = build(setup)
    restored.load_state_dict(state)
    measured = objective.measurements.pop()
    assert measured and restored.measurements.pop() == measured  # the metric window survives a resume


# ---------------------------------------------------------------------------------------- †CMLM in vanilla METER
def build_vanilla(setup, config, *overrides):
    """The trainer's construction for a non-EPIC config: VLM engine + epic.wiring.build_objective."""
    from epic.config import load_config

    cfg = load_config(config, [f"data.root={setup['world']}", f"epic.teacher={setup['tmp'] / 'teacher'}",
                               f"data.micro_batch_size={BATCH}", f"train.global_batch_size={BATCH}",
                               "model.dropout=0.0", "train.max_steps=10", *overrides])
    engine, objective = build_engine(cfg, setup["paths"], BATCH)
    return cfg, engine, objective


def hand_alpha(teacher, batch):
    """Eq. 8 by hand: softmax over the real tokens of the head-mean of q_k K_k^T (no 1/sqrt(d) temperature)."""
    from epic.objectives.saliency import real_text_tokens

    query, keys = teacher.query_keys(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    scores = torch.einsum("bhd,bhld->bl", query.float(), keys.float()) / query.shape[1]
    scores = scores.masked_fill(~real_text_tokens(batch), float("-inf"))
    return torch.softmax(scores, dim=-1)


def test_cmlm_in_vanilla_meter_runs_a_step_and_masks_by_saliency(setup):
    import math

    from epic.objectives.saliency import real_text_tokens
    from epic.objectives.vanilla import SaliencyCMLM

    cfg, engine, objective = build_vanilla(setup, "shapes_tiny_cmlm")
    assert cfg.data.mlm_masking == "saliency" and not cfg.epic.enabled
    # no generator (engine or module), no ITC head: METER's objectives only
    assert objective.extra_engines() == {} and not hasattr(objective, "generator")
    assert getattr(engine.module, "itc_score", None) is None
    batch, real = setup["batch"], real_text_tokens(setup["batch"])
    masked = objective.cmlm(batch, torch.Generator().manual_seed(0))
    positions = masked["cmlm_positions"]
    lengths = real.sum(1)
    assert positions.sum(1).tolist() == [math.ceil(cfg.data.mlm_probability * n) for n in lengths.tolist()]
    assert not (positions & ~real).any()
    labels, ids = masked["mlm_labels"], masked["mlm_input_ids"]
    assert torch.equal(labels != -100, positions) and torch.equal(labels[positions], batch["input_ids"][positions])
    assert torch.equal(ids[~positions], batch["input_ids"][~positions])
    alpha = hand_alpha(objective.cmlm.teacher, batch)
    torch.testing.assert_close(masked["cmlm_alpha"][real], alpha[real], atol=1e-5, rtol=1e-4)
    # one position per caption: inclusion frequency = alpha exactly (Categorical(alpha)), far from uniform
    one = SaliencyCMLM(objective.cmlm.teacher, 1e-6, objective.cmlm.mask_token_id, objective.cmlm.replacement_ids)
    rng, draws = torch.Generator().manual_seed(1), 300
    counts = sum(one(batch, rng)["cmlm_positions"].float() for _ in range(draws))
    frequency = counts / draws
    assert (frequency[real] - alpha[real]).abs().max() < 0.09
    uniform = real.float() / lengths[:, None]
    assert (alpha[real] - uniform[real]).abs().max() > 0.15, "the test teacher's saliency is too flat to tell"
    # the step: L_ITM + L_MLM on the saliency-masked captions; the VLM learns
    before = weights(engine.module)
    out = train_step(engine, objective, batch, 0)
    assert set(out) >= {"loss", "loss_itm", "loss_mlm", "cmlm_content_hit_rate"} and "loss_itc" not in out
    assert out["loss"].item() == pytest.approx((out["loss_itm"] + out["loss_mlm"]).item(), rel=1e-5)
    assert not same(before, weights(engine.module))


# --------------------------------------------------------------------------------------------- LM (trained)
def test_fit_generator_then_pretrained_fixed_loads_it_and_a_base_lm_is_refused(setup, capsys):
    """tools/fit_generator.py (text-only MLM on the shapes captions, DeepSpeed) -> an HF folder with its marker;
    epic.generator_mode=pretrained_fixed loads exactly those weights, frozen; an untouched LM folder is an error."""
    import importlib.util
    import json

    from transformers import RobertaForMaskedLM

    from epic.config import ConfigError
    from epic.models.generator import FITTED_MARKER

    out = setup["tmp"] / "lm_trained"
    spec = importlib.util.spec_from_file_location("fit_generator", os.path.join(ROOT, "tools", "fit_generator.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    # in this process (its one gloo rank): the tool's init_distributed finds the process group already started;
    # the rendezvous variables it exports are undone by the gloo_rank fixture after this module
    exit_code = tool.main(["--config", "shapes_tiny", "--out", str(out), "--steps", "30", "--batch-size", "16",
                          "--log-every", "10", "--lr", "2e-3", f"data.root={setup['world']}"])
    assert exit_code == 0
    logs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"step"')]
    assert [entry["step"] for entry in logs] == [10, 20, 30]
    assert logs[-1]["loss_gen"] < logs[0]["loss_gen"] - 0.5, logs  # it fits the captions
    marker = json.loads((out / FITTED_MARKER).read_text())
    assert marker["steps"] == 30 and marker["captions_seen"] == 480 and len(marker["shards"]) == 4
    assert marker["mlm_probability"] == 0.15

    _, engine, objective = build(setup, "epic.generator_mode=pretrained_fixed", f"epic.generator.pretrained={out}")
    assert objective.extra_engines() == {} and objective.generator_info["steps"] == 30
    saved = RobertaForMaskedLM.from_pretrained(str(out)).state_dict()
    loaded = objective.generator.lm.state_dict()
    assert all(torch.equal(loaded[k].float(), saved[k].float()) for k in saved)
    before = weights(objective.generator)
    out_step = train_step(engine, objective, setup["batch"], 0)
    assert torch.isfinite(out_step["loss"]) and same(before, weights(objective.generator))  # fixed

    base = setup["tmp"] / "base_lm"
    RobertaForMaskedLM.from_pretrained(str(out)).save_pretrained(str(base))  # the same LM without the marker
    with pytest.raises(ConfigError, match=r"untouched.*LM \(fixed\).*fit_generator"):
        build(setup, "epic.generator_mode=pretrained_fixed", f"epic.generator.pretrained={base}")
    _, _, fixed = build(setup, "epic.generator_mode=fixed", f"epic.generator.pretrained={base}")  # LM (fixed): fine
    assert fixed.extra_engines() == {}
