"""Downstream pieces against hand-computed cases and independent references: VQA soft scores and accuracy,
NLVR2 / SNLI-VE accuracy, task heads and weight loading, retrieval fine-tuning loss, task data and loaders."""
import itertools
import json

import numpy as np
import pytest
import torch

from epic.eval import nlvr2, snli_ve, vqa
from epic.models import downstream
from epic.models.configuration_meter import METERConfig
from epic.models.meter import METER

TINY = METERConfig(image_size=32, patch_size=16, vit_width=32, vit_layers=1, vit_heads=2, vocab_size=60,
                   text_hidden_size=32, text_layers=1, text_heads=2, text_intermediate_size=64,
                   text_max_position_embeddings=40, max_text_len=12, hidden_size=32, num_heads=2,
                   num_fusion_layers=2, mlp_ratio=2, dropout=0.0)


# ------------------------------------------------------------------------------------------------ VQA
def _leave_one_out_reference(count: int, n: int) -> float:
    """The official VQA accuracy: mean over the n subsets of n-1 annotators of min(1, matches / 3)."""
    answers = [True] * count + [False] * (n - count)
    return sum(min(1.0, sum(subset) / 3) for subset in itertools.combinations(answers, n - 1)) / n


@pytest.mark.parametrize("count", range(11))
def test_vqa_soft_score_is_the_official_leave_one_out_accuracy(count):
    assert vqa.soft_score(count, 10) == pytest.approx(_leave_one_out_reference(count, 10))


def test_vqa_soft_score_table():
    assert [round(vqa.soft_score(c, 10), 6) for c in range(5)] == [0.0, 0.3, 0.6, 0.9, 1.0]


def test_answer_scores_and_answer_list():
    scores = vqa.answer_scores(["Yes", "yes", "no", "yes.", "maybe"] + ["yes"] * 5)
    assert scores == {"yes": pytest.approx(1.0), "no": pytest.approx(0.3), "maybe": pytest.approx(0.3)}
    assert vqa.answer_scores({"Two": 0.6}) == {"two": 0.6}
    answers = vqa.build_answer_list([["a"] * 10, ["b"] * 10, ["a"] * 10, {"c": 1.0}], min_count=1)
    assert answers == ["a", "b", "c"]
    assert vqa.build_answer_list([["a"] * 10, ["b"] * 10, ["a"] * 10], min_count=2) == ["a"]


def test_vqa_accuracy_hand_computed():
    # 3 questions, 3 answers; predictions 2, 0, 1 earn 0.9, 0.0 and 1.0
    logits = torch.tensor([[0.1, 0.2, 0.9], [5.0, 1.0, 0.0], [0.0, 3.0, 2.0]])
    targets = torch.tensor([[0.0, 0.3, 0.9], [0.0, 1.0, 0.0], [0.3, 1.0, 0.0]])
    assert vqa.vqa_accuracy(logits, targets) == pytest.approx(100 * 1.9 / 3)


def test_vqa_target_vector_ignores_answers_outside_the_list():
    target = vqa.target_vector({"red": 1.0, "teal": 0.3}, {"red": 1, "blue": 0})
    assert target.tolist() == [0.0, 1.0]


class FixedLogits(torch.nn.Module):
    """A "model" returning the logits stored in the batch, so the evaluation loop is checked on its own."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, *tensors):
        return self.current


def test_evaluate_loops_hand_computed():
    model = FixedLogits()
    batches = [{"pixel_values": torch.zeros(2, 3, 4, 4), "input_ids": torch.zeros(2, 3, dtype=torch.long),
                "attention_mask": torch.ones(2, 3, dtype=torch.long), "labels": torch.tensor([1, 0]),
                "pixel_values_0": torch.zeros(2, 3, 4, 4), "pixel_values_1": torch.zeros(2, 3, 4, 4),
                "target_scores": torch.tensor([[1.0, 0.0], [0.3, 0.6]])},
               {"pixel_values": torch.zeros(1, 3, 4, 4), "input_ids": torch.zeros(1, 3, dtype=torch.long),
                "attention_mask": torch.ones(1, 3, dtype=torch.long), "labels": torch.tensor([1]),
                "pixel_values_0": torch.zeros(1, 3, 4, 4), "pixel_values_1": torch.zeros(1, 3, 4, 4),
                "target_scores": torch.tensor([[0.0, 0.9]])}]
    logits = [torch.tensor([[0.0, 1.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0]])]

    def loader():
        for batch, current in zip(batches, logits):
            model.current = current
            yield batch

    assert nlvr2.evaluate_nlvr2(model, loader()) == {"accuracy": pytest.approx(200 / 3), "num_examples": 3}
    batches[0]["kinds"], batches[1]["kinds"] = torch.tensor([0, 2]), torch.tensor([2])  # the shapes world's
    assert nlvr2.evaluate_nlvr2(model, loader(), kinds=("a", "b", "c")) == {  # kind "b" has no example
        "accuracy": pytest.approx(200 / 3), "num_examples": 3, "by_kind": {"a": 100.0, "c": 50.0}}
    assert "by_kind" not in nlvr2.evaluate_nlvr2(model, loader())  # no names given: overall accuracy only
    assert snli_ve.evaluate_snli_ve(model, loader())["accuracy"] == pytest.approx(200 / 3)
    assert vqa.evaluate_vqa(model, loader())["vqa_score"] == pytest.approx(100 * (0.0 + 0.6 + 0.9) / 3)


def test_label_parsing():
    assert [nlvr2.parse_label(v) for v in ("True", "false", True, 0, "1")] == [1, 0, 1, 0, 1]
    assert [snli_ve.parse_label(v) for v in ("entailment", "Neutral", "contradiction", 2)] == [2, 1, 0, 2]
    with pytest.raises(ValueError, match="NLVR2 label"):
        nlvr2.parse_label("maybe")
    with pytest.raises(ValueError, match="SNLI-VE label"):
        snli_ve.parse_label("yes")


# ------------------------------------------------------------------------------------------------ task models
def _inputs(batch=3, length=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TINY.vocab_size, (batch, length), generator=g)
    ids[:, 0] = 0
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, -3:] = 0
    ids[0, -3:] = TINY.pad_token_id
    return torch.randn(batch, 3, 32, 32, generator=g), ids, mask


def test_nlvr2_forward_is_two_fusion_passes_with_token_types_1_and_2():
    torch.manual_seed(0)
    model = downstream.METERForNLVR2(TINY).eval()
    px0, ids, mask = _inputs()
    px1 = torch.randn_like(px0)
    with torch.no_grad():
        out = model(px0, px1, ids, mask)
        first = model.infer(ids, mask, pixel_values=px0, image_token_type_idx=1)["cls_feats"]
        second = model.infer(ids, mask, pixel_values=px1, image_token_type_idx=2)["cls_feats"]
        reference = model.nlvr2_classifier(torch.cat([first, second], dim=-1))
    torch.testing.assert_close(out, reference)
    assert model.config.num_token_types == 3


def test_loading_pretrained_weights_into_task_models():
    torch.manual_seed(0)
    pretrained = METER(TINY)
    state = dict(pretrained.state_dict())
    state["itc_score.weight"] = torch.zeros(1, 32)  # EPIC's pretraining-only head is dropped
    nlvr = downstream.METERForNLVR2(TINY)
    report = downstream.load_pretrained_weights(nlvr, state)
    assert report["new_heads"] == ["nlvr2_classifier"] and report["dropped"] == ["itc_score"]
    rows = nlvr.token_type_embeddings.weight
    torch.testing.assert_close(rows[:2], pretrained.token_type_embeddings.weight)
    torch.testing.assert_close(rows[2], pretrained.token_type_embeddings.weight[1])  # METER copies the image row
    torch.testing.assert_close(nlvr.cross_modal_text_layers[1].output.dense.weight,
                               pretrained.cross_modal_text_layers[1].output.dense.weight)

    retrieval = downstream.METERForRetrieval(TINY)
    downstream.load_pretrained_weights(retrieval, pretrained.state_dict())
    torch.testing.assert_close(retrieval.rank_output.weight, pretrained.itm_score.fc.weight[1:])
    assert not any(p.requires_grad for p in retrieval.itm_score.parameters())
    assert not any(p.requires_grad for p in retrieval.mlm_score.parameters())

    bad = dict(pretrained.state_dict())
    bad["cross_modal_text_layers.9.foo"] = torch.zeros(1)
    del bad["cross_modal_text_transform.weight"]
    with pytest.raises(ValueError, match="missing.*cross_modal_text_transform.weight.*unexpected.*layers.9.foo"):
        downstream.load_pretrained_weights(downstream.METERForSNLIVE(TINY), bad)


def test_position_embedding_is_resampled_for_a_larger_image_size():
    import dataclasses

    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    pretrained = METER(TINY)
    larger = downstream.METERForSNLIVE(dataclasses.replace(TINY, image_size=48))
    downstream.load_pretrained_weights(larger, pretrained.state_dict())
    expected = resample_abs_pos_embed(pretrained.vit_model.pos_embed, new_size=[3, 3], num_prefix_tokens=1,
                                      interpolation="bicubic", antialias=False)
    torch.testing.assert_close(larger.vit_model.pos_embed, expected)
    assert larger.vit_model.pos_embed.shape[1] == 1 + 9


def test_retrieval_rank_loss_matches_per_pair_reference():
    torch.manual_seed(0)
    model = downstream.METERForRetrieval(TINY).eval()
    px, ids, mask = _inputs(batch=4)
    image_ids = torch.tensor([0, 1, 2, 2])
    negatives = torch.tensor([[1, 2], [0, 3], [0, 1], [1, 0]])
    out = downstream.retrieval_rank_loss(model, px, ids, mask, image_ids, 2, hard=False, negatives=negatives)
    rows = []
    for b in range(4):  # straightforward: one full forward per (image, caption) pair
        texts = [b] + negatives[b].tolist()
        scores = [model.rank_output(model.infer(ids[t:t + 1], mask[t:t + 1], pixel_values=px[b:b + 1])["cls_feats"])
                  for t in texts]
        rows.append(torch.cat(scores).view(-1))
    reference = torch.nn.functional.cross_entropy(torch.stack(rows), torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(out["loss"], reference, rtol=1e-5, atol=1e-6)
    # gradients against autograd of the reference
    model.zero_grad()
    out["loss"].backward()
    fast = model.rank_output.weight.grad.clone()
    model.zero_grad()
    rows = []
    for b in range(4):
        texts = [b] + negatives[b].tolist()
        rows.append(torch.cat([model.rank_output(model.infer(ids[t:t + 1], mask[t:t + 1],
                                                             pixel_values=px[b:b + 1])["cls_feats"])
                               for t in texts]).view(-1))
    torch.nn.functional.cross_entropy(torch.stack(rows), torch.zeros(4, dtype=torch.long)).backward()
    torch.testing.assert_close(fast, model.rank_output.weight.grad, rtol=1e-4, atol=1e-7)


def test_negative_captions_never_come_from_the_same_image():
    g = torch.Generator().manual_seed(0)
    image_ids = torch.tensor([0, 0, 1, 2, 3, 3])
    same = image_ids.view(-1, 1) == image_ids.view(1, -1)
    sim = torch.randn(6, 6, generator=g)
    for hard in (False, True):
        neg = downstream.choose_negative_texts(sim, same, 3, hard, g)
        assert neg.shape == (6, 3)
        for b in range(6):
            assert len(set(neg[b].tolist())) == 3
            assert all(image_ids[t] != image_ids[b] for t in neg[b].tolist())
    # hard negatives follow the similarity: an overwhelming one is always picked
    sim = torch.zeros(6, 6)
    sim[0, 4] = 50.0
    assert all(4 in downstream.choose_negative_texts(sim, same, 1, True, g)[0].tolist() for _ in range(5))
    with pytest.raises(ValueError, match="micro_batch_size"):
        downstream.choose_negative_texts(sim, same, 5, False, g)


def test_vqa_loss_is_bce_times_num_answers():
    logits = torch.tensor([[0.5, -1.0, 2.0]])
    target = torch.tensor([[0.0, 0.3, 1.0]])
    p = torch.sigmoid(logits)
    reference = -(target * p.log() + (1 - target) * (1 - p).log()).mean() * 3
    torch.testing.assert_close(downstream.vqa_loss(logits, target), reference)


# ------------------------------------------------------------------------------------------------ task data
@pytest.fixture(scope="module")
def tasks_root(tmp_path_factory):
    from epic.data.tasks import generate_shapes_tasks

    return generate_shapes_tasks(tmp_path_factory.mktemp("tasks"), n_train=24, n_val=8, image_size=32)


def test_shapes_tasks_are_deterministic_and_well_formed(tasks_root, tmp_path):
    from epic.data.tasks import TASKS, generate_shapes_tasks

    again = generate_shapes_tasks(tmp_path, n_train=24, n_val=8, image_size=32)
    for task in TASKS:
        for split in ("train", "val"):
            assert (again / task / f"{split}.json").read_bytes() == (tasks_root / task / f"{split}.json").read_bytes()
    nlvr = json.loads((tasks_root / "nlvr2" / "train.json").read_text())
    assert {r["label"] for r in nlvr} == {"True", "False"}
    snli = json.loads((tasks_root / "snli_ve" / "train.json").read_text())
    assert {r["label"] for r in snli} == {"entailment", "neutral", "contradiction"}
    answers = set(json.loads((tasks_root / "vqa" / "answers.json").read_text()))
    for record in json.loads((tasks_root / "vqa" / "val.json").read_text()):
        assert record["question"].startswith(("what colour", "how many"))
        assert len(record["answer"]) == 10
        assert set(record["answer"]) <= answers, record  # every annotator answer is in the answer list


def test_images_from_folder_and_from_shards_are_identical(tasks_root):
    from epic.data.tasks import load_task_data, open_images

    folder = open_images(str(tasks_root / "images"))
    shards = open_images(str(tasks_root / "image_shards" / "00000.tar"))
    for name in ("train_00003.jpg", "val_00007.jpg", "somewhere/else/train_00000.jpg"):
        a, b = folder.load(name.split("/")[-1]), shards.load(name)
        assert (np.asarray(a) == np.asarray(b)).all()
    with pytest.raises(FileNotFoundError, match="nope"):
        shards.load("nope.jpg")
    with pytest.raises(FileNotFoundError, match="finetune.images"):
        folder.load("nope.jpg")
    with pytest.raises(ValueError, match="lacks"):
        bad = tasks_root / "bad.json"
        bad.write_text(json.dumps([{"image": "x.jpg"}]))
        load_task_data("snli_ve", str(bad), str(tasks_root / "images"))


def test_train_loader_resumes_with_the_next_batch(tasks_root, shapes_world):
    from epic.data import load_tokenizer
    from epic.data.tasks import build_task_train_loader, load_task_data

    tokenizer = load_tokenizer(shapes_world / "tokenizer")
    data = load_task_data("snli_ve", str(tasks_root / "snli_ve" / "train.json"), str(tasks_root / "images"))

    def loader():  # 48 examples, 2 ranks, batch 8: 3 batches per epoch and rank
        return build_task_train_loader(data, tokenizer, image_size=32, max_text_len=16, batch_size=8, seed=3,
                                       rank=1, world_size=2, randaugment=True)

    first = loader()
    stream = iter(first)
    taken = [next(stream) for _ in range(4)]  # crosses into epoch 1
    state = first.state_dict()
    assert state["epoch"] == 1 and state["batch_in_epoch"] == 1
    expected = [next(stream) for _ in range(2)]
    resumed = loader()
    resumed.load_state_dict(state)
    got = [batch for _, batch in zip(range(2), resumed)]
    for a, b in zip(expected, got):
        assert torch.equal(a["input_ids"], b["input_ids"])
        torch.testing.assert_close(a["pixel_values"], b["pixel_values"])  # seeded augmentation
    assert not torch.equal(taken[0]["input_ids"], taken[3]["input_ids"])  # a new permutation per epoch
    other_rank = build_task_train_loader(data, tokenizer, image_size=32, max_text_len=16, batch_size=8, seed=3,
                                         rank=0, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        other_rank.load_state_dict({**state, "world_size": 1})


def test_eval_loaders_split_examples_across_ranks(tasks_root, shapes_world):
    from epic.data import load_tokenizer
    from epic.data.tasks import build_task_eval_loader, load_task_data

    tokenizer = load_tokenizer(shapes_world / "tokenizer")
    data = load_task_data("retrieval", str(tasks_root / "retrieval" / "val.json"), str(tasks_root / "images"),
                          for_training=False)
    seen = []
    for rank in range(2):
        for batch in build_task_eval_loader(data, tokenizer, image_size=32, max_text_len=16, batch_size=3,
                                            rank=rank, world_size=2):
            assert batch["input_ids"].shape[0] == batch["image_index"].shape[0] == batch["pixel_values"].shape[0]
            seen += [(rank, int(i)) for i in batch["image_index"]]
    images = {i for _, i in seen}
    assert images == set(range(8))
    assert all(rank == i % 2 for rank, i in seen)
    assert len(seen) == sum(len(e["captions"]) for e in data.examples)


def test_nlvr2_batches_carry_the_statement_kind_only_for_the_shapes_world(tasks_root, shapes_world, tmp_path):
    from epic.data import load_tokenizer
    from epic.data.tasks import NLVR2_KINDS, build_task_eval_loader, load_task_data, nlvr2_statement_kind

    tokenizer = load_tokenizer(shapes_world / "tokenizer")
    val = tasks_root / "nlvr2" / "val.json"
    data = load_task_data("nlvr2", str(val), str(tasks_root / "images"), for_training=False)
    kinds = [int(k) for b in build_task_eval_loader(data, tokenizer, image_size=32, max_text_len=16, batch_size=3,
                                                    rank=0, world_size=1) for k in b["kinds"]]
    assert kinds == [NLVR2_KINDS.index(nlvr2_statement_kind(r["sentence"])) for r in json.loads(val.read_text())]
    records = json.loads(val.read_text())
    records[0]["sentence"] = "the dog is asleep"  # a statement of no template: a real NLVR2 file has no kinds
    other = tmp_path / "val.json"
    other.write_text(json.dumps(records))
    data = load_task_data("nlvr2", str(other), str(tasks_root / "images"), for_training=False)
    batch = next(iter(build_task_eval_loader(data, tokenizer, image_size=32, max_text_len=16, batch_size=3,
                                             rank=0, world_size=1)))
    assert "kinds" not in batch
