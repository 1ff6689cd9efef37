"""Retrieval evaluation: metrics against hand-computed ranks, encode-once caching, shortlist == exhaustive."""
import pytest
import torch
from torch import nn

from launch import free_port
from epic.eval import retrieval


# ----------------------------------------------------------------------------------------------------------------
# Metrics against a hand-computed score matrix
# ----------------------------------------------------------------------------------------------------------------
def test_recall_metrics_hand_computed():
    # 3 images, 5 captions: image 0 owns texts 0,1; image 1 owns 2,3; image 2 owns 4.
    text_to_image = torch.tensor([0, 0, 1, 1, 2])
    scores = torch.tensor([
        # t0   t1   t2   t3   t4
        [0.1, 0.9, 0.5, 0.2, 0.0],   # best gt t1 (0.9) beats everything  -> TR rank 0
        [0.8, 0.1, 0.3, 0.7, 0.6],   # best gt t3 (0.7); wrong t0 (0.8) above -> TR rank 1
        [0.5, 0.4, 0.9, 0.6, 0.2],   # gt t4 (0.2); wrong t0,t1,t2,t3 above -> TR rank 4
    ])
    # IR, per text column: t0 own 0.1 < 0.8, 0.5 -> rank 2; t1 own 0.9 -> 0; t2 own 0.3 < 0.5, 0.9 -> 2;
    # t3 own 0.7 -> 0; t4 own 0.2 < 0.6 -> 1 (0.0 below).
    assert retrieval.text_retrieval_ranks(scores, text_to_image).tolist() == [0, 1, 4]
    assert retrieval.image_retrieval_ranks(scores, text_to_image).tolist() == [2, 0, 2, 0, 1]
    m = retrieval.recall_metrics(scores, text_to_image, ks=(1, 2, 5))
    assert m["tr_r1"] == pytest.approx(100 / 3)
    assert m["tr_r2"] == pytest.approx(200 / 3)
    assert m["tr_r5"] == pytest.approx(100.0)
    assert m["ir_r1"] == pytest.approx(40.0)
    assert m["ir_r2"] == pytest.approx(60.0)
    assert m["ir_r5"] == pytest.approx(100.0)
    assert m["r_mean"] == pytest.approx((100 / 3 + 200 / 3 + 100 + 40 + 60 + 100) / 6)


def test_ties_count_against_the_ground_truth():
    text_to_image = torch.tensor([0, 1])
    constant = torch.zeros(2, 2)
    m = retrieval.recall_metrics(constant, text_to_image)
    assert m["tr_r1"] == 0.0 and m["ir_r1"] == 0.0
    assert m["tr_r5"] == 100.0  # 1 wrong candidate ties -> rank 1 < 5
    # -inf outside a shortlist: a gt caption left out of the shortlist is a miss at rank 1
    scores = torch.tensor([[float("-inf"), 1.0], [float("-inf"), 2.0]])
    assert retrieval.image_retrieval_ranks(scores, text_to_image).tolist() == [1, 0]


def test_image_without_caption_is_an_error():
    with pytest.raises(ValueError, match="no caption"):
        retrieval.recall_metrics(torch.zeros(3, 2), torch.tensor([0, 1]))


# ----------------------------------------------------------------------------------------------------------------
# A tiny stand-in with METER's API (encode_image / encode_text / infer / itm_score) that counts tower calls
# ----------------------------------------------------------------------------------------------------------------
class CountingModel(nn.Module):
    def __init__(self, width=8, vocab=20):
        super().__init__()
        torch.manual_seed(0)
        self.patch = nn.Linear(3 * 4 * 4, width)
        self.embed = nn.Embedding(vocab, width)
        self.cross_modal_image_transform = nn.Linear(width, width)
        self.cross_modal_text_transform = nn.Linear(width, width)
        self.mix = nn.Bilinear(width, width, 2 * width)
        self.itm_score = nn.Linear(2 * width, 2)
        self.images_encoded = 0
        self.texts_encoded = 0

    def encode_image(self, pixel_values):
        self.images_encoded += pixel_values.shape[0]
        b = pixel_values.shape[0]
        patches = pixel_values.unfold(2, 4, 4).unfold(3, 4, 4)  # [B,3,h,w,4,4]
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, -1, 3 * 16)
        return self.patch(patches)

    def encode_text(self, input_ids, attention_mask):
        self.texts_encoded += input_ids.shape[0]
        return self.embed(input_ids)

    def infer(self, pixel_values=None, input_ids=None, attention_mask=None, image_embeds=None, text_embeds=None):
        if image_embeds is None:
            image_embeds = self.encode_image(pixel_values)
        if text_embeds is None:
            text_embeds = self.encode_text(input_ids, attention_mask)
        img = self.cross_modal_image_transform(image_embeds).mean(1)
        m = attention_mask.unsqueeze(-1).float()
        txt = (self.cross_modal_text_transform(text_embeds) * m).sum(1) / m.sum(1)
        return {"cls_feats": torch.tanh(self.mix(txt, img))}

    def retrieval_embeddings(self, image_embeds, text_embeds, attention_mask):  # the shortlist stage (as METER's)
        m = attention_mask.unsqueeze(-1).float()
        return (self.cross_modal_image_transform(image_embeds).mean(1),
                (self.cross_modal_text_transform(text_embeds) * m).sum(1) / m.sum(1))


def make_loader(num_images=6, caps_per_image=2, batch=4, length=5, seed=1, rank=0, world_size=1):
    """Eval batches like epic.data's eval loader: this rank's images (index % world_size == rank), all captions."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(num_images, 3, 8, 8, generator=g)
    rows = [(i, c) for c in range(caps_per_image) for i in range(num_images)]  # captions interleaved
    ids = torch.randint(3, 20, (len(rows), length), generator=g)
    mask = torch.ones(len(rows), length, dtype=torch.long)
    mask[::3, -2:] = 0
    mine = [r for r, (i, _) in enumerate(rows) if i % world_size == rank]
    batches = []
    for s in range(0, len(mine), batch):
        chunk = torch.tensor(mine[s:s + batch])
        idx = torch.tensor([rows[r][0] for r in chunk])
        batches.append({"pixel_values": pixels[idx], "input_ids": ids[chunk], "attention_mask": mask[chunk],
                        "image_index": idx})
    return batches


def test_each_image_and_text_encoded_once():
    model = CountingModel()
    loader = make_loader(num_images=6, caps_per_image=3)
    metrics = retrieval.evaluate_retrieval(model, loader, batch_size=4)
    assert model.images_encoded == 6
    assert model.texts_encoded == 18
    assert metrics["num_images"] == 6 and metrics["num_texts"] == 18
    assert set(retrieval.METRIC_KEYS) <= set(metrics)


def test_cached_scores_equal_per_pair_forward():
    model = CountingModel().eval()
    loader = make_loader()
    data = retrieval.encode_eval_set(model, loader, batch_size=4)
    scores = retrieval.retrieval_scores(model, data, batch_size=5)
    rows = [(batch["pixel_values"][j], batch["input_ids"][j], batch["attention_mask"][j])
            for batch in loader for j in range(len(batch["image_index"]))]
    pixels = {int(i): batch["pixel_values"][j] for batch in loader for j, i in enumerate(batch["image_index"])}
    with torch.no_grad():
        for t, (_, ids, mask) in enumerate(rows):
            for i, px in pixels.items():
                out = model.infer(pixel_values=px[None], input_ids=ids[None], attention_mask=mask[None])
                ref = retrieval.default_pair_score(model, out["cls_feats"])
                torch.testing.assert_close(scores[i, t], ref[0])


@pytest.mark.parametrize("k_test", [6, 12, 100])
def test_shortlist_with_k_at_least_n_equals_exhaustive(k_test):
    model = CountingModel()
    loader = make_loader(num_images=6, caps_per_image=2)
    exhaustive = retrieval.evaluate_retrieval(model, loader, k_test=0)
    shortlisted = retrieval.evaluate_retrieval(model, loader, k_test=k_test)
    for key in retrieval.METRIC_KEYS:
        assert shortlisted[key] == pytest.approx(exhaustive[key])


def test_shortlist_scores_only_shortlisted_pairs():
    model = CountingModel().eval()
    data = retrieval.encode_eval_set(model, make_loader(num_images=6, caps_per_image=2))
    exhaustive = retrieval.retrieval_scores(model, data, k_test=0)
    short = retrieval.retrieval_scores(model, data, k_test=1)
    kept = torch.isfinite(short)
    image_vec, text_vec = retrieval.first_stage_embeddings(model, data)
    sim = image_vec @ text_vec.T
    expected = torch.zeros_like(kept)
    expected[torch.arange(6), sim.argmax(1)] = True
    expected[sim.argmax(0), torch.arange(12)] = True
    assert torch.equal(kept, expected)
    torch.testing.assert_close(short[kept], exhaustive[kept])


def test_max_images_keeps_first_images_only():
    model = CountingModel()
    metrics = retrieval.evaluate_retrieval(model, make_loader(num_images=6, caps_per_image=2), max_images=4)
    assert metrics["num_images"] == 4 and metrics["num_texts"] == 8
    assert model.images_encoded == 4


# ----------------------------------------------------------------------------------------------------------------
# Two ranks (gloo): rows split by image, all-gathered; same metrics as one process, half the images each
# ----------------------------------------------------------------------------------------------------------------
def _two_rank_worker(rank, port, queue):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = CountingModel().eval()
        loader = make_loader(num_images=7, caps_per_image=2, rank=rank, world_size=2)
        data = retrieval.encode_eval_set(model, loader)
        images_encoded = model.images_encoded
        for k_test in (0, 2):
            scores = retrieval.retrieval_scores(model, data, k_test=k_test)
            metrics = retrieval.recall_metrics(scores, data.text_to_image)
            # numpy, not tensors: torch shares tensors through memory that dies with this process
            queue.put((k_test, rank, images_encoded, scores.numpy(), data.input_ids.numpy(), metrics))
    finally:
        dist.destroy_process_group()


def test_two_ranks_split_rows_and_gather():
    import torch.multiprocessing as mp
    port = free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_two_rank_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=180) for _ in range(4)), key=lambda r: r[:2])
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    model = CountingModel().eval()
    data = retrieval.encode_eval_set(model, make_loader(num_images=7, caps_per_image=2))
    assert [r[2] for r in results] == [4, 3, 4, 3]  # images 0,2,4,6 on rank 0; 1,3,5 on rank 1
    for k_test, _, _, scores, input_ids, metrics in results:
        reference = retrieval.retrieval_scores(model, data, k_test=k_test)
        reference_metrics = retrieval.recall_metrics(reference, data.text_to_image)
        assert metrics == pytest.approx(reference_metrics)
        # captions arrive in rank order: match each column to the reference column with the same token ids
        columns = [next(j for j, ref in enumerate(data.input_ids.tolist()) if ref == row) for row in input_ids.tolist()]
        torch.testing.assert_close(torch.from_numpy(scores), reference[:, columns])


def test_gaps_in_image_index_are_compacted():
    model = CountingModel()
    loader = make_loader(num_images=6, caps_per_image=2)
    for batch in loader:
        batch["image_index"] = batch["image_index"] * 3 + 5  # undecodable samples leave gaps
    data = retrieval.encode_eval_set(model, loader)
    assert data.num_images == 6
    assert data.image_ids.tolist() == list(range(6))
    assert sorted(set(data.text_to_image.tolist())) == list(range(6))


# ----------------------------------------------------------------------------------------------------------------
# The first stage is the family's (epic.models.interface.VLPModel.retrieval_embeddings)
# ----------------------------------------------------------------------------------------------------------------
def test_a_family_without_a_first_stage_refuses_k_test_but_scores_exhaustively():
    from epic.models.interface import VLPModel

    class NoFirstStage(CountingModel):
        retrieval_embeddings = VLPModel.retrieval_embeddings

    model = NoFirstStage()
    assert retrieval.evaluate_retrieval(model, make_loader(), k_test=0)["num_texts"] == 12
    with pytest.raises(NotImplementedError, match="NoFirstStage defines no retrieval first stage.*eval.k_test=0"):
        retrieval.evaluate_retrieval(model, make_loader(), k_test=2)


def test_meter_first_stage_is_the_pooled_cross_modal_projections():
    """METER's shortlist vectors: mean over image tokens / over real text tokens of the cross_modal_* outputs."""
    from epic.models.meter import METER, METERConfig

    torch.manual_seed(0)
    model = METER(METERConfig(image_size=32, patch_size=16, vit_width=32, vit_layers=1, vit_heads=2,
                              text_hidden_size=32, text_layers=1, text_heads=2, text_intermediate_size=64,
                              hidden_size=32, num_heads=2, num_fusion_layers=2, mlp_ratio=2, vocab_size=30,
                              max_text_len=8, pad_token_id=1)).eval()
    image_embeds, text_embeds = torch.randn(3, 5, 32), torch.randn(2, 8, 32)
    mask = torch.tensor([[1] * 8, [1] * 3 + [0] * 5])
    image_vec, text_vec = model.retrieval_embeddings(image_embeds, text_embeds, mask)
    with torch.no_grad():
        torch.testing.assert_close(image_vec, model.cross_modal_image_transform(image_embeds).mean(1))
        for row, length in enumerate((8, 3)):
            expected = model.cross_modal_text_transform(text_embeds[row, :length]).mean(0)
            torch.testing.assert_close(text_vec[row], expected)
