"""EPIC's equations in the integration (no DeepSpeed): Eq. 8 by hand, masking counts and frequencies, Eq. 6 labels,
ITC vs binary_cross_entropy_with_logits, the generator's states vs HF logits, the frozen teacher, measurements."""
import itertools
import json
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM

from epic.config import ConfigError, load_config
from epic.eval.epic_metrics import ratios, step_counts, summarize_run
from epic.models.configuration_meter import METERConfig
from epic.models.generator import EpicGenerator
from epic.models.meter import METER, to_official_state_dict
from epic.models.teacher import SaliencyTeacher, TeacherError, check_teacher_fits, load_teacher
from epic.objectives.consistency import add_consistency_head, consistency_loss
from epic.objectives.corruption import (consistency_labels, excluded_token_ids, inconsistent_positions, mask_tokens,
                                        replace_at, sample_replacements)
from epic.objectives.saliency import real_text_tokens, saliency_masking, uniform_masking

CLS, PAD, SEP, MASK = 0, 1, 2, 3


def tiny_meter(**overrides) -> METER:
    values = dict(image_size=32, patch_size=16, vit_width=32, vit_layers=2, vit_heads=2, vocab_size=40,
                  text_hidden_size=24, text_layers=1, text_heads=2, text_intermediate_size=48,
                  text_max_position_embeddings=16, max_text_len=8, hidden_size=32, num_heads=4,
                  num_fusion_layers=3, dropout=0.0)
    values.update(overrides)
    torch.manual_seed(0)
    model = METER(METERConfig(**values)).eval()
    with torch.no_grad():  # non-trivial weights everywhere
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (0.5 if p.dim() == 1 else 0.0))
    return model


def caption_batch(batch=3, length=8, vocab=40, seed=0):
    """<s> w ... </s> <pad>...: row 1 is padded after 5 tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch, length), generator=g)
    lengths = [length, 5, length - 1][:batch] + [length] * max(0, batch - 3)
    attention = torch.zeros(batch, length, dtype=torch.long)
    special = torch.zeros(batch, length, dtype=torch.bool)
    for row, n in enumerate(lengths):
        ids[row, 0], ids[row, n - 1], ids[row, n:] = CLS, SEP, PAD
        attention[row, :n] = 1
        special[row, 0] = special[row, n - 1:] = True
    return {"input_ids": ids, "attention_mask": attention, "special_tokens_mask": special,
            "pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}


# ----------------------------------------------------------------------------------------------------------------
# Eq. 8
# ----------------------------------------------------------------------------------------------------------------
def projections_by_hooks(model, batch):
    """The penultimate image-stream cross-attention's Q (image [CLS]) and K (text) captured from a full forward."""
    captured = {}
    attention = model.cross_modal_image_layers[model.config.num_fusion_layers - 2].crossattention.self
    hooks = [attention.query.register_forward_hook(lambda m, i, o: captured.setdefault("q", o)),
             attention.key.register_forward_hook(lambda m, i, o: captured.setdefault("k", o))]
    with torch.no_grad():
        model.infer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"])
    for hook in hooks:
        hook.remove()
    heads, b = model.config.num_heads, batch["input_ids"].shape[0]
    q = captured["q"][:, 0].reshape(b, heads, -1)
    k = captured["k"].reshape(b, captured["k"].shape[1], heads, -1).transpose(1, 2)
    return q.double(), k.double()


def test_eq8_saliency_matches_hand_computation():
    model = tiny_meter()
    batch = caption_batch()
    teacher = SaliencyTeacher(tiny_meter())
    query, keys = teacher.query_keys(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    q_ref, k_ref = projections_by_hooks(model, batch)
    torch.testing.assert_close(query.double(), q_ref, rtol=1e-5, atol=1e-5)  # pruned teacher = full model's layer
    torch.testing.assert_close(keys.double(), k_ref, rtol=1e-5, atol=1e-5)

    real = real_text_tokens(batch)
    _, alpha = saliency_masking(query.clone(), keys.clone(), real, 0.35, torch.Generator().manual_seed(0))
    heads = q_ref.shape[1]
    for b in range(real.shape[0]):
        valid = [j for j in range(real.shape[1]) if real[b, j]]
        scores = {j: sum(float(q_ref[b, k] @ k_ref[b, k, j]) for k in range(heads)) / heads for j in valid}
        top = max(scores.values())
        total = sum(math.exp(s - top) for s in scores.values())
        for j in range(real.shape[1]):
            expected = math.exp(scores[j] - top) / total if j in scores else 0.0
            assert alpha[b, j].item() == pytest.approx(expected, rel=1e-4, abs=1e-6), (b, j)


def test_teacher_is_frozen_pruned_and_in_eval_mode():
    teacher = SaliencyTeacher(tiny_meter().train())
    assert not teacher.training and not any(m.training for m in teacher.modules())
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    names = {n.split(".")[1] for n, _ in teacher.named_parameters()}
    assert not names & {"mlm_score", "itm_score", "cross_modal_text_pooler", "cross_modal_image_pooler"}
    layers = teacher.config.num_fusion_layers
    assert len(teacher.vlm.cross_modal_image_layers) == layers - 1
    assert not any(n.startswith(f"vlm.cross_modal_text_layers.{layers - 2}.") for n, _ in teacher.named_parameters())
    batch = caption_batch()
    query, _ = teacher.query_keys(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    assert query.is_inference() and not query.requires_grad


def test_teacher_loads_export_dir_and_official_checkpoint(tmp_path):
    model = tiny_meter(hidden_size=64, num_heads=1, vit_width=64, vit_heads=1, text_hidden_size=64, text_heads=1)
    batch = caption_batch()
    expected = SaliencyTeacher(tiny_meter(hidden_size=64, num_heads=1, vit_width=64, vit_heads=1,
                                          text_hidden_size=64, text_heads=1))
    q_ref, k_ref = expected.query_keys(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    torch.save({"state_dict": to_official_state_dict(model)}, tmp_path / "meter.ckpt")
    add_consistency_head(model)  # an EPIC model's export carries beta: the teacher drops it
    model.save_pretrained(str(tmp_path / "export"))
    for source in (tmp_path / "export", tmp_path / "meter.ckpt"):
        teacher = load_teacher(str(source), "cpu", "auto")
        query, keys = teacher.query_keys(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        torch.testing.assert_close(query, q_ref)
        torch.testing.assert_close(keys, k_ref)
        assert next(teacher.parameters()).dtype == torch.float32  # "auto" on CPU
    assert next(load_teacher(str(tmp_path / "export"), "cpu", "bf16").parameters()).dtype == torch.bfloat16
    narrow = tiny_meter(hidden_size=64, num_heads=4)  # 4 heads of 16: not width // 64, so a JSON names them
    torch.save({"state_dict": to_official_state_dict(narrow)}, tmp_path / "narrow.ckpt")
    (tmp_path / "narrow.json").write_text(json.dumps({"num_heads": 4, "vit_heads": 2, "text_heads": 2}))
    query, keys = load_teacher(str(tmp_path / "narrow.ckpt"), "cpu").query_keys(
        batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    expected = SaliencyTeacher(tiny_meter(hidden_size=64, num_heads=4)).query_keys(
        batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close((query, keys), expected)


def test_teacher_errors_name_the_problem(tmp_path):
    with pytest.raises(TeacherError, match="does not exist"):
        load_teacher(str(tmp_path / "nowhere"), "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherError, match="no complete checkpoint"):
        load_teacher(str(tmp_path / "empty"), "cpu")

    class Tok:
        pad_token_id = PAD

        def __len__(self):
            return 40

    with pytest.raises(TeacherError, match="64px"):
        check_teacher_fits(SaliencyTeacher(tiny_meter()), Tok(), image_size=64, max_text_len=8)


# ----------------------------------------------------------------------------------------------------------------
# Masking: counts, positions, inclusion frequencies
# ----------------------------------------------------------------------------------------------------------------
def expected_count(length: int, ratio: str) -> int:
    return math.ceil(Fraction(ratio) * length)


@pytest.mark.parametrize("ratio", ["0.35", "0.15", "1.0"])
def test_masking_counts_and_positions(ratio):
    batch = caption_batch(batch=6, length=24, seed=3)
    real = real_text_tokens(batch)
    assert real.sum(1).tolist() == [22, 3, 21, 22, 22, 22]
    g = torch.Generator().manual_seed(0)
    query, keys = torch.randn(6, 2, 4, generator=g), torch.randn(6, 2, 24, 4, generator=g)
    for mask, alpha in (saliency_masking(query, keys, real, float(ratio), g), uniform_masking(real, float(ratio), g)):
        assert mask.dtype == torch.bool
        assert not (mask & ~real).any()  # never a special token or padding
        assert mask.sum(1).tolist() == [expected_count(int(n), ratio) for n in real.sum(1)]  # a set: no duplicates
        torch.testing.assert_close(alpha.sum(1), torch.ones(6))
        assert (alpha[~real] == 0).all()


def plackett_luce_inclusion(probs: list[float], m: int) -> list[float]:
    """P(i among the first m draws without replacement), by enumerating the ordered draws."""
    inclusion = [0.0] * len(probs)
    for order in itertools.permutations(range(len(probs)), m):
        p, left = 1.0, 1.0
        for i in order:
            p *= probs[i] / left
            left -= probs[i]
        for i in order:
            inclusion[i] += p
    return inclusion


def test_saliency_masking_inclusion_frequencies_match_exact_probabilities():
    draws = 20000
    scores = torch.tensor([0.0, 1.2, -0.5, 0.3, 2.0, 0.0])  # positions 0 and 5 are <s> / </s>
    real = torch.tensor([False, True, True, True, True, False]).expand(draws, 6)
    query = torch.ones(draws, 1, 1)
    keys = scores.view(1, 1, 6, 1).expand(draws, 1, 6, 1).contiguous()
    mask, alpha = saliency_masking(query, keys, real, 0.35, torch.Generator().manual_seed(1234))
    probs = torch.softmax(scores[1:5].double(), 0).tolist()
    m = expected_count(4, "0.35")
    exact = plackett_luce_inclusion(probs, m)
    frequencies = mask[:, 1:5].double().mean(0).tolist()
    for f, p in zip(frequencies, exact):
        assert abs(f - p) < 4.5 * math.sqrt(p * (1 - p) / draws), (frequencies, exact)
    torch.testing.assert_close(alpha[0, 1:5].double(), torch.tensor(probs, dtype=torch.double), rtol=1e-5, atol=1e-6)
    uniform, _ = uniform_masking(real, 0.35, torch.Generator().manual_seed(5))
    for f in uniform[:, 1:5].double().mean(0).tolist():
        assert abs(f - m / 4) < 4.5 * math.sqrt(0.25 / draws)


# ----------------------------------------------------------------------------------------------------------------
# Eq. 3, 6 and the ITC loss (Eq. 1-2)
# ----------------------------------------------------------------------------------------------------------------
def test_eq3_and_eq6_labels():
    ids = torch.tensor([[CLS, 10, 11, 12, 13, SEP, PAD]])
    positions = torch.tensor([[False, True, False, True, True, False, False]])
    assert mask_tokens(ids, positions, MASK).tolist() == [[CLS, MASK, 11, MASK, MASK, SEP, PAD]]
    corrupted = replace_at(ids, positions, torch.tensor([10, 20, 21]))  # the first sample equals the original
    assert corrupted.tolist() == [[CLS, 10, 11, 20, 21, SEP, PAD]]
    inconsistent = inconsistent_positions(ids, corrupted, positions)
    assert inconsistent.tolist() == [[False, False, False, True, True, False, False]]
    assert consistency_labels(inconsistent).tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]]


def test_itc_loss_matches_binary_cross_entropy_with_logits():
    g = torch.Generator().manual_seed(0)
    batch = caption_batch(batch=4, length=9, seed=1)
    real = real_text_tokens(batch)
    feats = torch.randn(4, 9, 16, generator=g, requires_grad=True)
    head = torch.nn.Linear(16, 1)
    inconsistent = (torch.rand(4, 9, generator=g) < 0.3) & real
    loss, logits = consistency_loss(feats, head, inconsistent, real)
    ref_feats = feats.detach().clone().requires_grad_(True)
    ref_w, ref_b = head.weight.detach().clone().requires_grad_(True), head.bias.detach().clone().requires_grad_(True)
    z = (ref_feats @ ref_w.T + ref_b).squeeze(-1)
    reference = F.binary_cross_entropy_with_logits(z[real], (~inconsistent[real]).float())
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(logits, z.detach())
    loss.backward()
    reference.backward()
    torch.testing.assert_close(feats.grad, ref_feats.grad)
    torch.testing.assert_close(head.weight.grad, ref_w.grad)
    torch.testing.assert_close(head.bias.grad, ref_b.grad)


def test_itc_reductions_token_mean_and_pair_sum_by_hand():
    """Eq. 2 by hand on two captions (4 and 2 real tokens): token_mean = total / 6 tokens, pair_sum = total / 2
    pairs; a padded row with no real token is not a pair."""
    head = torch.nn.Linear(1, 1)
    with torch.no_grad():
        head.weight.fill_(1.0)
        head.bias.zero_()
    z = torch.tensor([[0.5, -1.0, 2.0, 0.0, 9.0], [1.0, 3.0, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0, 9.0]])
    real = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    inconsistent = torch.tensor([[0, 1, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    log_sig = lambda x: -math.log1p(math.exp(-x))  # log sigmoid(x)
    pair0 = -(log_sig(0.5) + log_sig(1.0) + log_sig(2.0) + log_sig(0.0))  # token 1 inconsistent: log(1 - D) = log_sig(-z)
    pair1 = -(log_sig(1.0) + log_sig(-3.0))
    for reduction, want in (("token_mean", (pair0 + pair1) / 6), ("pair_sum", (pair0 + pair1) / 2)):
        loss, _ = consistency_loss(z[..., None], head, inconsistent, real, reduction)
        assert loss.item() == pytest.approx(want, rel=1e-6), reduction
    with pytest.raises(ValueError, match="token_mean"):
        consistency_loss(z[..., None], head, inconsistent, real, "mean_over_everything")


# ----------------------------------------------------------------------------------------------------------------
# The generator (Eq. 3-5, 7)
# ----------------------------------------------------------------------------------------------------------------
def tiny_lm(family: str):
    torch.manual_seed(0)
    sizes = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                 max_position_embeddings=20, pad_token_id=PAD, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0)
    if family == "roberta":
        return RobertaForMaskedLM(RobertaConfig(**sizes, type_vocab_size=1)).eval()
    return BertForMaskedLM(BertConfig(**sizes)).eval()


@pytest.mark.parametrize("family", ["roberta", "bert"])
def test_generator_states_give_the_hf_logits_and_l_gen(family):
    generator = EpicGenerator(tiny_lm(family)).eval()
    batch = caption_batch()
    real = real_text_tokens(batch)
    positions, _ = uniform_masking(real, 0.35, torch.Generator().manual_seed(0))
    masked = mask_tokens(batch["input_ids"], positions, MASK)
    states = generator(masked, batch["attention_mask"], positions)
    embedding, bias = generator.output_embedding()
    logits = generator.lm(input_ids=masked, attention_mask=batch["attention_mask"]).logits[positions]
    torch.testing.assert_close(states @ embedding.T + bias, logits, rtol=1e-5, atol=1e-5)
    targets = batch["input_ids"][positions]
    samples, loss = sample_replacements(states, embedding, bias, targets, [CLS, PAD, SEP, MASK],
                                        torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets))  # Eq. 7 as a mean over M
    assert samples.shape == targets.shape


def test_replacements_never_special_tokens():
    generator = EpicGenerator(tiny_lm("roberta")).eval()
    with torch.no_grad():  # make the specials overwhelmingly likely
        generator.lm.lm_head.bias[[CLS, PAD, SEP, MASK]] = 30.0
    batch = caption_batch(batch=8, length=8, seed=2)
    real = real_text_tokens(batch)
    positions = real.clone()
    states = generator(mask_tokens(batch["input_ids"], positions, MASK), batch["attention_mask"], positions)
    embedding, bias = generator.output_embedding()

    class Tok:
        all_special_ids = [CLS, PAD, SEP, MASK]

        def __len__(self):
            return 38  # two model rows beyond the tokenizer are never sampled either

    exclude = excluded_token_ids(Tok(), 40)
    assert exclude == [CLS, PAD, SEP, MASK, 38, 39]
    with torch.no_grad():
        samples, _ = sample_replacements(states, embedding, bias, batch["input_ids"][positions], exclude,
                                         torch.Generator().manual_seed(0))
    assert not set(samples.tolist()) & set(exclude)


def test_conditioned_generator_reads_the_image_without_sending_it_gradient():
    generator = EpicGenerator(tiny_lm("roberta"), image_width=12).eval()
    batch = caption_batch()
    positions = real_text_tokens(batch)
    image_cls = torch.randn(3, 12, requires_grad=True)
    states = generator(batch["input_ids"], batch["attention_mask"], positions, image_cls)
    other = generator(batch["input_ids"], batch["attention_mask"], positions, torch.randn(3, 12))
    assert not torch.allclose(states, other)  # the image [CLS] feature changes the predictions
    states.sum().backward()
    assert image_cls.grad is None  # stop-gradient into the VLM
    assert generator.image_projection.weight.grad is not None  # the projection itself is trained
    with pytest.raises(ValueError, match="needs image_cls"):
        generator(batch["input_ids"], batch["attention_mask"], positions)


# ----------------------------------------------------------------------------------------------------------------
# Measurements, run summary, config checks
# ----------------------------------------------------------------------------------------------------------------
def test_measurements_by_hand():
    real = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    masked = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    inconsistent = torch.tensor([[0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    logits = torch.tensor([[0.0, -1.0, 2.0, -3.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0, 0.0, 0.0]])
    alpha = torch.tensor([[0, 0.25, 0.25, 0.25, 0.25, 0], [0, 1.0, 0.0, 0, 0, 0]])
    content = torch.tensor([[0, 1, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    values = ratios(step_counts(real, masked, inconsistent, logits, alpha, content).tolist())
    assert values["inconsistent_token_ratio"] == pytest.approx(1 / 6)
    assert values["inconsistent_sentence_ratio"] == pytest.approx(1 / 2)
    assert values["itc_acc_inconsistent"] == pytest.approx(1.0)  # z = -1 < 0: predicted inconsistent
    assert values["itc_acc_consistent"] == pytest.approx(4 / 5)  # z = 2, -3, 1 and 1, 1: only -3 is wrong
    assert values["gen_acc_masked"] == pytest.approx(2 / 3)
    assert values["saliency_entropy"] == pytest.approx(math.log(4) / 2)
    assert values["saliency_entropy_normalized"] == pytest.approx(0.5)
    assert values["content_hit_rate"] == pytest.approx(1 / 2)  # only sentence 0 has content words
    assert values["content_hit_rate_uniform"] == pytest.approx(2 / 4)


def test_summarize_run_averages_the_last_logs(tmp_path, capsys):
    rows = [{"step": s, "train/loss": 1.0, "epic/inconsistent_token_ratio": s / 10, "train/loss_itc": 0.5}
            for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary = summarize_run(tmp_path, last=2)
    assert summary["step"] == 3 and summary["epic/inconsistent_token_ratio"] == pytest.approx(0.25)
    assert "train/loss" not in summary
    from epic.eval.epic_metrics import main

    assert main(["--run", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["log_rows_averaged"] == 3
    assert main(["--run", str(tmp_path / "none")]) == 2


@pytest.mark.parametrize("overrides, message", [
    (["data.mlm_masking=saliency", "epic.masking=uniform"], "needs epic.masking=saliency"),
    (["epic.cmlm_saliency=true"], "replaced by data.mlm_masking=saliency"),
    (["epic.corruption=random", "epic.generator_mode=fixed"], "no effect with epic.corruption=random"),
    (["epic.generator_mode=pretrained_fixed"], "needs epic.generator.pretrained"),
    (["epic.lambda_itc=-1"], "lambda_itc"),
    (["epic.generator_mode=lm"], "must be one of"),
])
def test_impossible_ablations_fail_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("epic_shapes_tiny", ["epic.teacher=/t", *overrides])


def test_generator_from_a_hf_folder_must_match_the_vlm(tmp_path):
    from epic.models.generator import build_generator
    from epic.config import GeneratorConfig

    lm = tiny_lm("roberta")
    lm.save_pretrained(str(tmp_path / "lm"))
    vlm_text = METERConfig(text_model_type="roberta", vocab_size=40, pad_token_id=PAD)
    generator = build_generator(GeneratorConfig(pretrained=str(tmp_path / "lm")), vlm_text)
    for name, value in lm.state_dict().items():
        assert torch.equal(generator.lm.state_dict()[name], value), name
    with pytest.raises(ConfigError, match="vocab_size: generator 40 vs VLM 50"):
        build_generator(GeneratorConfig(pretrained=str(tmp_path / "lm")), METERConfig(vocab_size=50, pad_token_id=PAD))
    with pytest.raises(ConfigError, match="neither a local HF folder"):
        build_generator(GeneratorConfig(pretrained=str(tmp_path)), vlm_text)


def test_generator_deepspeed_config(tmp_path):
    from epic.engine.setup import SetupError, derive_batch_math, load_ds_config, resolve_ds_config
    from epic.objectives.consistency import generator_ds_config

    batch_math = derive_batch_math(16, 4, 2)
    vlm = resolve_ds_config(load_ds_config("ds_configs/cpu_zero2.json"), batch_math, 1.0, on_cpu=True)
    cfg = load_config("epic_shapes_tiny", ["epic.teacher=/t"])
    assert generator_ds_config(cfg, vlm, batch_math, on_cpu=True) == vlm  # default: the VLM's resolved JSON
    cfg = load_config("epic_shapes_tiny", ["epic.teacher=/t", "epic.generator.ds_config=ds_configs/generator_fp16.json"])
    with pytest.raises(SetupError, match="fp16 is not supported by DeepSpeed on CPU"):  # the VLM's rule, for all
        generator_ds_config(cfg, vlm, batch_math, on_cpu=True)
    on_gpu = generator_ds_config(cfg, vlm, batch_math, on_cpu=False)
    assert on_gpu["fp16"]["enabled"] and on_gpu["gradient_accumulation_steps"] == 2  # same boundaries as the VLM
    assert on_gpu["train_micro_batch_size_per_gpu"] == 4 and on_gpu["gradient_clipping"] == cfg.train.grad_clip
