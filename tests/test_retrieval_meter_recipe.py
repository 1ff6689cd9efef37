"""Retrieval as METER does it (zdou0830/METER objectives.compute_irtr / compute_irtr_recall, meter_module.py):
zero-shot scores are the raw ITM match logit, a fine-tuned model scores with rank_output (initialised from that
row), the rank loss is a softmax over [positive, 15 random captions of other images], checked by hand."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from epic.data.tasks import TaskData, TaskDataset, make_collate
from epic.eval import retrieval
from epic.models import downstream
from epic.models.configuration_meter import METERConfig
from epic.models.meter import METER

TINY = METERConfig(image_size=32, patch_size=16, vit_width=32, vit_layers=1, vit_heads=2, vocab_size=60,
                   text_hidden_size=32, text_layers=1, text_heads=2, text_intermediate_size=64,
                   text_max_position_embeddings=40, max_text_len=12, hidden_size=32, num_heads=2,
                   num_fusion_layers=2, mlp_ratio=2, dropout=0.0, initializer_range=0.2)


def _pretrained(seed=0) -> METER:
    torch.manual_seed(seed)
    model = METER(TINY).eval()
    with torch.no_grad():  # an ITM head whose two rows differ clearly, so raw logit and log p(match) rank apart
        model.itm_score.fc.weight.normal_(0, 1.0)
        model.itm_score.fc.bias.copy_(torch.tensor([0.3, -0.7]))
    return model


def _eval_loader(num_images=4, caps=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(num_images, 3, 32, 32, generator=g)
    ids = torch.randint(3, 60, (num_images * caps, 12), generator=g)
    ids[:, 0] = 0
    mask = torch.ones_like(ids)
    mask[::3, 8:] = 0
    index = torch.arange(num_images).repeat_interleave(caps)
    return [{"pixel_values": pixels[index], "input_ids": ids, "attention_mask": mask, "image_index": index}], pixels


def _hand_match_logit(model, pixels, ids, mask) -> torch.Tensor:
    """[I, T]: fusion of each pair one at a time, then w_1 . cls + b_1 written out (no itm_score call)."""
    weight, bias = model.itm_score.fc.weight[1], model.itm_score.fc.bias[1]
    out = torch.empty(pixels.shape[0], ids.shape[0])
    for i in range(pixels.shape[0]):
        for t in range(ids.shape[0]):
            cls = model.infer(ids[t:t + 1], mask[t:t + 1], pixel_values=pixels[i:i + 1])["cls_feats"][0]
            out[i, t] = (cls * weight).sum() + bias
    return out


@torch.no_grad()
def test_zero_shot_scores_are_the_raw_itm_match_logit():
    model = _pretrained()
    loader, pixels = _eval_loader()
    batch = loader[0]
    data = retrieval.encode_eval_set(model, loader, batch_size=3)
    scores = retrieval.retrieval_scores(model, data, k_test=0, batch_size=5)
    expected = _hand_match_logit(model, pixels, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    # not log p(match): that is another score (and here another ranking)
    full = torch.empty(*expected.shape, 2)
    for i in range(pixels.shape[0]):
        out = model.infer(batch["input_ids"], batch["attention_mask"], pixel_values=pixels[i:i + 1].expand(
            batch["input_ids"].shape[0], -1, -1, -1))
        full[i] = model.itm_score(out["cls_feats"])
    log_p = full.log_softmax(-1)[..., 1]
    assert not torch.allclose(log_p, scores, atol=1e-3)
    assert (log_p.argsort(dim=1) != scores.argsort(dim=1)).any()


@torch.no_grad()
def test_untrained_rank_output_scores_like_zero_shot():
    """METER initialises rank_output from itm_score.fc row 1 (weight and bias): before fine-tuning the retrieval
    model's score matrix is the zero-shot one."""
    pretrained = _pretrained()
    model = downstream.METERForRetrieval(TINY).eval()
    downstream.load_pretrained_weights(model, pretrained.state_dict())
    assert torch.equal(model.rank_output.weight, pretrained.itm_score.fc.weight[1:])
    assert torch.equal(model.rank_output.bias, pretrained.itm_score.fc.bias[1:])
    loader, _ = _eval_loader(seed=2)
    zero_shot = retrieval.retrieval_scores(pretrained, retrieval.encode_eval_set(pretrained, loader), k_test=0)
    ranked = retrieval.retrieval_scores(model, retrieval.encode_eval_set(model, loader), k_test=0)
    torch.testing.assert_close(ranked, zero_shot, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and a fine-tuned model scores with its rank_output, not the ITM head
        model.rank_output.bias.add_(1.0)
    moved = retrieval.retrieval_scores(model, retrieval.encode_eval_set(model, loader), k_test=0)
    torch.testing.assert_close(moved, zero_shot + 1.0, rtol=1e-5, atol=1e-5)


def test_rank_loss_by_hand():
    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 0.5, 0.5]])
    # -log softmax at the positive (index 0), averaged over images
    first = -(2.0 - torch.log(torch.exp(torch.tensor([2.0, 1.0, 0.0, -1.0])).sum()))
    second = -(0.0 - torch.log(torch.exp(torch.tensor([0.0, 3.0, 0.5, 0.5])).sum()))
    assert downstream.rank_loss(scores).item() == pytest.approx(((first + second) / 2).item(), rel=1e-6)


def test_rank_loss_with_drawn_captions_matches_per_pair_forwards_and_autograd():
    torch.manual_seed(3)
    model = downstream.METERForRetrieval(TINY)
    g = torch.Generator().manual_seed(4)
    batch, n = 3, 4
    px = torch.randn(batch, 3, 32, 32, generator=g)
    ids = torch.randint(3, 60, (batch, 1 + n, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[:, 1:, 9:] = 0
    out = downstream.retrieval_rank_loss_with_texts(model, px, ids[:, 0], mask[:, 0], ids[:, 1:], mask[:, 1:])

    def reference():
        rows = []
        for b in range(batch):  # straightforward: one full forward (both towers) per (image, caption) pair
            rows.append(torch.cat([model.rank_output(model.infer(ids[b, t:t + 1], mask[b, t:t + 1],
                                                                 pixel_values=px[b:b + 1])["cls_feats"])
                                   for t in range(1 + n)]).view(-1))
        scores = torch.stack(rows)
        return -(scores[:, 0] - scores.logsumexp(dim=1)).mean()

    expected = reference()
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    fast = torch.autograd.grad(out["loss"], params, allow_unused=True)
    slow = torch.autograd.grad(reference(), params, allow_unused=True)
    for a, b in zip(fast, slow):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert model.itm_score.fc.weight.requires_grad is False  # METER freezes the ITM head


class _Images:
    def load(self, name):
        return Image.new("RGB", (32, 32), (int(name) * 7 % 255, 10, 20))


class _Tokenizer:
    """Whitespace tokenizer with the HF call signature the collate uses."""

    def __call__(self, texts, max_length, truncation, padding, return_tensors):
        ids = torch.ones(len(texts), max_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, text in enumerate(texts):
            words = [0] + [int(w) % 50 + 3 for w in text.split()][:max_length - 2] + [2]
            ids[row, :len(words)] = torch.tensor(words)
            mask[row, :len(words)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def _retrieval_train_data(num_images=20, caps=5) -> TaskData:
    examples = [{"image": str(i), "text": f"{i} {c} {i * caps + c}", "image_id": i}
                for i in range(num_images) for c in range(caps)]
    return TaskData("retrieval", examples, _Images())


def test_each_image_gets_15_distinct_random_captions_of_other_images():
    data = _retrieval_train_data()
    dataset = TaskDataset(data, image_size=32, training=True, randaugment=False, seed=5, num_negative_texts=15)
    drawn = set()
    for index in range(len(data.examples)):
        item = dataset[(0, index)]
        chosen = item["negative_examples"]
        assert len(chosen) == 15 and len(set(chosen)) == 15
        assert all(data.examples[c]["image_id"] != data.examples[index]["image_id"] for c in chosen)
        assert item["negative_texts"] == [data.examples[c]["text"] for c in chosen]
        assert dataset[(0, index)]["negative_examples"] == chosen  # seeded: a resumed run draws the same
        drawn.update(chosen)
    assert len(drawn) > 0.9 * len(data.examples)  # from the whole training file, not a fixed few
    assert dataset[(1, 0)]["negative_examples"] != dataset[(0, 0)]["negative_examples"]  # new draw each epoch
    batch = make_collate(_Tokenizer(), 12)([dataset[(0, i)] for i in range(4)])
    assert batch["negative_input_ids"].shape == (4, 15, 12) and batch["negative_attention_mask"].shape == (4, 15, 12)
    first = _Tokenizer()(dataset[(0, 2)]["negative_texts"], 12, True, "max_length", "pt")["input_ids"]
    assert torch.equal(batch["negative_input_ids"][2], first)
    with pytest.raises(ValueError, match="lower finetune.num_negatives"):
        TaskDataset(_retrieval_train_data(num_images=3, caps=5), 32, True, False, 0, num_negative_texts=11)


def test_itm_term_is_added_with_its_weight():
    torch.manual_seed(6)
    model = downstream.METERForRetrieval(TINY).eval()
    g = torch.Generator().manual_seed(7)
    batch = {"pixel_values": torch.randn(4, 3, 32, 32, generator=g),
             "input_ids": torch.randint(3, 60, (4, 12), generator=g), "attention_mask": torch.ones(4, 12).long(),
             "negative_input_ids": torch.randint(3, 60, (4, 3, 12), generator=g),
             "negative_attention_mask": torch.ones(4, 3, 12).long(), "image_ids": torch.tensor([0, 1, 2, 2])}
    alone = downstream.retrieval_losses(model, batch, negatives="random", num_negatives=3, itm_weight=0.0,
                                        generator=torch.Generator().manual_seed(8))
    assert "loss_itm" not in alone
    both = downstream.retrieval_losses(model, batch, negatives="random", num_negatives=3, itm_weight=0.5,
                                       generator=torch.Generator().manual_seed(8))
    labels, image_index = downstream.mismatched_images(batch["image_ids"], torch.Generator().manual_seed(8))
    assert labels.sum() == 2 and all(batch["image_ids"][image_index[b]] != batch["image_ids"][b]
                                     for b in range(4) if labels[b] == 0)
    logits = torch.cat([model.itm_score(model.infer(batch["input_ids"][b:b + 1], batch["attention_mask"][b:b + 1],
                                                    pixel_values=batch["pixel_values"][image_index[b]][None])
                                        ["cls_feats"]) for b in range(4)])
    itm = F.cross_entropy(logits, labels)
    torch.testing.assert_close(both["loss"], alone["loss"] + 0.5 * itm, rtol=1e-5, atol=1e-6)


def test_finetune_config_defaults_are_meters_recipe():
    from epic.config import ConfigError
    from epic.finetune_config import FinetuneConfig, TaskConfig, build_dataclass, validate_finetune

    ft = FinetuneConfig()
    assert (ft.num_negatives, ft.negatives, ft.itm_weight) == (15, "random", 0.0)
    old = build_dataclass(TaskConfig, {"finetune": {"task": "retrieval", "hard_negatives": True}})
    validate_finetune(old)  # a config saved before finetune.negatives existed
    assert old.finetune.negatives == "hard" and old.finetune.hard_negatives is None
    bad = build_dataclass(TaskConfig, {"finetune": {"task": "retrieval", "negatives": "mined"}})
    with pytest.raises(ConfigError, match="finetune.negatives"):
        validate_finetune(bad)
    assert dataclasses.replace(ft, negatives="hard").negatives == "hard"


def test_retrieval_model_initialises_from_an_official_checkpoint():
    """finetune.py --init meter.ckpt for retrieval: the file has no rank_output (a pretraining checkpoint); it is a
    new head, taken from the ITM match row, not a 'missing key' error."""
    from epic.models.meter import from_official_state_dict, to_official_state_dict

    pretrained = _pretrained(seed=9)
    model = downstream.METERForRetrieval(TINY)
    weights = from_official_state_dict(to_official_state_dict(pretrained), model, allow_missing_heads=True)
    report = downstream.load_pretrained_weights(model, weights)
    assert report["new_heads"] == ["rank_output"]
    assert torch.equal(model.rank_output.weight, pretrained.itm_score.fc.weight[1:])
    assert torch.equal(model.rank_output.bias, pretrained.itm_score.fc.bias[1:])
