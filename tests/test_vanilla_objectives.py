"""Vanilla METER objectives: shared image features give the re-encoding gradients; ITM pairs; MLM masking."""
import pytest
import torch
import torch.nn.functional as F

from epic.models.configuration_meter import METERConfig
from epic.models.meter import METER
from epic.objectives.itm import compute_itm, draw_itm_pairs
from epic.objectives.mlm import compute_mlm, mlm_cross_entropy
from epic.objectives.vanilla import vanilla_losses

VOCAB = 40


def tiny_model(seed=0) -> METER:
    torch.manual_seed(seed)
    cfg = METERConfig(image_size=32, patch_size=16, vit_width=32, vit_layers=2, vit_heads=2, vocab_size=VOCAB,
                      text_hidden_size=32, text_layers=1, text_heads=2, text_intermediate_size=64,
                      text_max_position_embeddings=16, max_text_len=8, hidden_size=32, num_heads=2,
                      num_fusion_layers=2, dropout=0.0)
    return METER(cfg)


def make_batch(seed=0, batch=4, length=8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    ids[:, 0] = 0
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 5:] = 0
    ids[0, 5:] = 1
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    labels[1, 4] = ids[1, 4]
    mlm_ids = ids.clone()
    mlm_ids[labels != -100] = 2  # <mask>
    return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": mask,
            "mlm_input_ids": mlm_ids, "mlm_labels": labels}


def test_shared_image_features_give_the_reencoding_gradients():
    model = tiny_model()
    batch = make_batch(batch=5)
    grads, losses = {}, {}
    for share in (True, False):
        model.zero_grad()
        out = vanilla_losses(model, batch, torch.Generator().manual_seed(7), share_image_embeds=share)
        out["loss"].backward()
        losses[share] = out
        grads[share] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for key in ("loss", "loss_mlm", "loss_itm", "mlm_acc", "itm_acc"):
        torch.testing.assert_close(losses[True][key], losses[False][key], rtol=1e-5, atol=1e-6, msg=key)
    assert grads[True].keys() == grads[False].keys()
    assert any(n.startswith("vit_model.blocks") for n in grads[True])  # the vision tower does get gradients
    for name in grads[True]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-4, atol=1e-6, msg=name)


def test_shared_mode_runs_the_vision_tower_once():
    model = tiny_model()
    calls = []
    model.vit_model.register_forward_hook(lambda *args: calls.append(1))
    original = model.encode_image
    model.encode_image = lambda pixels, **kw: (calls.append("encode"), original(pixels, **kw))[1]
    vanilla_losses(model, make_batch(), torch.Generator().manual_seed(0), share_image_embeds=True)
    assert calls.count("encode") == 1
    calls.clear()
    vanilla_losses(model, make_batch(), torch.Generator().manual_seed(0), share_image_embeds=False)
    assert calls.count("encode") == 2


@pytest.mark.parametrize("batch_size", [2, 3, 4, 7, 16])
def test_itm_pairs_half_matched_rest_deranged(batch_size):
    for seed in range(20):
        pairs = draw_itm_pairs(batch_size, torch.Generator().manual_seed(seed), torch.device("cpu"))
        matched = pairs.labels == 1
        assert int(matched.sum()) == batch_size // 2  # METER: pos_len = len // 2
        assert torch.equal(pairs.image_index[matched], torch.arange(batch_size)[matched])
        assert bool((pairs.image_index[~matched] != torch.arange(batch_size)[~matched]).all())
        assert bool(((pairs.image_index >= 0) & (pairs.image_index < batch_size)).all())
    again = draw_itm_pairs(batch_size, torch.Generator().manual_seed(3), torch.device("cpu"))
    first = draw_itm_pairs(batch_size, torch.Generator().manual_seed(3), torch.device("cpu"))
    assert torch.equal(again.image_index, first.image_index) and torch.equal(again.labels, first.labels)
    with pytest.raises(ValueError, match="at least 2"):
        draw_itm_pairs(1, torch.Generator(), torch.device("cpu"))


def test_itm_negatives_cover_every_other_image():
    seen = set()
    for seed in range(200):
        pairs = draw_itm_pairs(4, torch.Generator().manual_seed(seed), torch.device("cpu"))
        seen.update((i, int(j)) for i, j in enumerate(pairs.image_index) if pairs.labels[i] == 0)
    assert seen == {(i, j) for i in range(4) for j in range(4) if i != j}


def test_compute_itm_fuses_each_caption_with_its_drawn_image():
    model = tiny_model().eval()
    batch = make_batch()
    embeds = model.encode_image(batch["pixel_values"])
    pairs = draw_itm_pairs(4, torch.Generator().manual_seed(11), torch.device("cpu"))
    seen = {}
    original = model.infer
    model.infer = lambda **kw: (seen.update(kw), original(**kw))[1]
    out = compute_itm(model, batch, embeds, torch.Generator().manual_seed(11))
    torch.testing.assert_close(seen["image_embeds"], embeds[pairs.image_index])
    assert seen["input_ids"] is batch["input_ids"]
    logits = model.itm_score(original(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      image_embeds=embeds[pairs.image_index])["cls_feats"])
    torch.testing.assert_close(out["loss_itm"], F.cross_entropy(logits, pairs.labels))


def test_mlm_loss_counts_only_labelled_positions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, VOCAB, generator=g, requires_grad=True)
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[1, 3], labels[1, 4] = 7, 2, 9
    out = mlm_cross_entropy(logits, labels)
    picked = torch.stack([logits[0, 1], logits[1, 3], logits[1, 4]])
    expected = -picked.log_softmax(-1)[torch.arange(3), torch.tensor([7, 2, 9])].mean()
    torch.testing.assert_close(out["loss_mlm"], expected)
    out["loss_mlm"].backward()
    assert logits.grad[labels == -100].abs().max() == 0  # unlabelled positions get no gradient
    assert logits.grad[labels != -100].abs().max() > 0
    nothing = mlm_cross_entropy(torch.randn(2, 5, VOCAB), torch.full((2, 5), -100))
    assert nothing["loss_mlm"].item() == 0.0 and nothing["mlm_acc"].item() == 0.0


def test_compute_mlm_reads_the_masked_ids_and_ignores_unlabelled_ones():
    model = tiny_model().eval()
    batch = make_batch()
    embeds = model.encode_image(batch["pixel_values"])
    base = compute_mlm(model, batch, embeds)["loss_mlm"]
    changed_plain = dict(batch, input_ids=torch.randint(3, VOCAB, batch["input_ids"].shape))
    torch.testing.assert_close(compute_mlm(model, changed_plain, embeds)["loss_mlm"], base)  # not the plain ids
    changed_masked = dict(batch, mlm_input_ids=batch["mlm_input_ids"].roll(1, dims=1))
    assert not torch.allclose(compute_mlm(model, changed_masked, embeds)["loss_mlm"], base)
    # one more labelled position enters the loss
    more_labels = batch["mlm_labels"].clone()
    more_labels[2, 5] = 3
    assert not torch.allclose(compute_mlm(model, dict(batch, mlm_labels=more_labels), embeds)["loss_mlm"], base)
    with pytest.raises(KeyError, match="mlm_labels"):
        vanilla_losses(model, {k: v for k, v in batch.items() if k != "mlm_labels"}, torch.Generator())


def test_step_flops_per_sample_counts_what_a_real_step_costs():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from epic.objectives.vanilla import step_flops_per_sample

    model = tiny_model()
    counted = {}
    for share in (True, False):
        # the math backend: FlopCounterMode has no formula for the CPU flash-attention kernel
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            vanilla_losses(model, make_batch(batch=2), torch.Generator().manual_seed(0), share)["loss"].backward()
        counted[share] = counter.get_total_flops() / 2
        assert step_flops_per_sample(model.config, share, text_len=8, batch_size=2) == counted[share]
    assert counted[True] < counted[False]
