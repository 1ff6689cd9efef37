"""Image-text retrieval evaluation: R@1/5/10 for text retrieval (TR) and image retrieval (IR) from ITM scores.

METER scores every (image, text) pair with its ITM head and re-encodes the image for every text batch, which is
why its COCO-5k evaluation takes hours. Here every image goes through the vision tower once and every caption
through the text encoder once; only the fusion layers run per pair:

    1. encode: image tower once per image (this rank's images only), text encoder once per caption
    2. first stage (only when k_test > 0): a cheap similarity between pooled unimodal features picks, for every
       image, its k_test best texts (TR) and, for every text, its k_test best images (IR)
    3. ITM: the fusion layers + ITM head score every pair (exhaustive) or the union of both shortlists
    4. the score matrix rows (images) are split across ranks and all-gathered; metrics are computed on it.

First-stage score: the cosine of the family's `retrieval_embeddings(image_embeds, text_embeds, text_mask) ->
(image_vectors, text_vectors)` (epic.models.interface; contrastive families return their trained embeddings, the
others a documented heuristic; a family without one refuses k_test > 0). With k_test >= the number of
candidates the shortlist is everything and the result equals the exhaustive one.

Pair score. The default (a pretrained model, zero-shot) is the raw ITM match logit itm_score(cls_feats)[:, 1], as
METER and ViLT rank: their retrieval models' rank_output is initialised from that row of the ITM head, so
before fine-tuning it scores exactly this. (log p(match) = -softplus(l0 - l1) would rank by l1 - l0 instead: another
ranking.) A task model may define `pair_score(cls_feats)`: the fine-tuned retrieval model scores with rank_output.

Metrics (in percent, as papers report them). With S the [images x texts] score matrix and gt(t) the image of text t:
    TR rank of image i = #{wrong texts t : S[i, t] >= max over i's own texts of S[i, t']}
    IR rank of text t  = #{wrong images i : S[i, t] >= S[gt(t), t]}
    R@k = 100 * mean(rank < k)
Ties count against the ground truth, so a model that scores everything alike gets R@1 = 0, not an accident.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

log = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10)
METRIC_KEYS = tuple(f"{d}_r{k}" for d in ("tr", "ir") for k in RECALL_KS) + ("r_mean",)


# ----------------------------------------------------------------------------------------------------------------
# Metrics on a score matrix
# ----------------------------------------------------------------------------------------------------------------
def text_retrieval_ranks(scores: torch.Tensor, text_to_image: torch.Tensor) -> torch.Tensor:
    """For each image (row), the number of wrong texts scored at least as high as its best ground-truth text."""
    n_images, n_texts = scores.shape
    is_gt = text_to_image.view(1, n_texts) == torch.arange(n_images).view(n_images, 1)  # [I, T]
    if not bool(is_gt.any(dim=1).all()):
        missing = (~is_gt.any(dim=1)).nonzero().flatten()[:5].tolist()
        raise ValueError(f"images {missing} have no caption in the eval set: every image needs at least one")
    best_gt = scores.masked_fill(~is_gt, float("-inf")).amax(dim=1, keepdim=True)
    return ((scores >= best_gt) & ~is_gt).sum(dim=1)


def image_retrieval_ranks(scores: torch.Tensor, text_to_image: torch.Tensor) -> torch.Tensor:
    """For each text (column), the number of wrong images scored at least as high as its own image."""
    n_texts = scores.shape[1]
    own = scores[text_to_image, torch.arange(n_texts)].view(1, n_texts)
    is_gt = torch.arange(scores.shape[0]).view(-1, 1) == text_to_image.view(1, n_texts)
    return ((scores >= own) & ~is_gt).sum(dim=0)


def recall_metrics(scores: torch.Tensor, text_to_image: torch.Tensor, ks: Iterable[int] = RECALL_KS) -> dict:
    """`tr_r1 … ir_r10` in percent and their mean `r_mean` from an [images x texts] score matrix."""
    scores = scores.float().cpu()
    text_to_image = text_to_image.long().cpu()
    if scores.shape[1] != text_to_image.numel():
        raise ValueError(f"score matrix has {scores.shape[1]} text columns but text_to_image has "
                         f"{text_to_image.numel()} entries")
    tr = text_retrieval_ranks(scores, text_to_image)
    ir = image_retrieval_ranks(scores, text_to_image)
    out = {}
    for name, ranks in (("tr", tr), ("ir", ir)):
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * (ranks < k).float().mean().item()
    out["r_mean"] = sum(out.values()) / len(out)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Encoding the eval set once
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class EncodedEvalSet:
    """Everything the fusion layers need, computed once. Images: only this rank's; texts: all of them."""

    image_ids: torch.Tensor  # [I_local] row (0..I-1, over all ranks) of each cached image, ascending
    image_embeds: torch.Tensor  # [I_local, N, vit_width] vision tower output
    num_images: int  # I, over all ranks
    text_embeds: torch.Tensor  # [T, L, text_width] text encoder output, every caption of every rank
    input_ids: torch.Tensor  # [T, L]
    attention_mask: torch.Tensor  # [T, L]
    text_to_image: torch.Tensor  # [T] row of each caption's image


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, param.dtype


def _all_gather_objects(obj) -> list:
    rank, world = _dist_info()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def _read_local_share(model, loader, max_images: int, batch_size: int):
    """Encode each image this rank's loader yields once; collect (not yet encode) its captions."""
    device, dtype = _model_device_dtype(model)
    seen: set[int] = set()
    image_index, image_embeds, pending_index, pending_pixels = [], [], [], []
    input_ids, attention_mask, text_image_index = [], [], []

    def flush_images():
        if pending_index:
            pixels = torch.stack(pending_pixels).to(device=device, dtype=dtype)
            image_embeds.append(model.encode_image(pixels))
            image_index.extend(pending_index)
            pending_index.clear()
            pending_pixels.clear()

    for batch in loader:
        if "image_index" not in batch:
            raise KeyError("retrieval evaluation needs eval batches with `image_index` (one row per (image, "
                           "caption)): build the loader with epic.data.build_eval_loader")
        index = batch["image_index"].long()
        keep = index < max_images if max_images > 0 else torch.ones_like(index, dtype=torch.bool)
        input_ids.append(batch["input_ids"][keep])
        attention_mask.append(batch["attention_mask"][keep])
        text_image_index.append(index[keep])
        for row in keep.nonzero().flatten().tolist():
            i = int(index[row])
            if i not in seen:
                seen.add(i)
                pending_index.append(i)
                pending_pixels.append(batch["pixel_values"][row])
                if len(pending_index) == batch_size:
                    flush_images()
    flush_images()
    cat = (lambda parts: torch.cat(parts)) if input_ids else (lambda parts: torch.empty(0, dtype=torch.long))
    return (torch.tensor(image_index, dtype=torch.long), image_embeds,
            cat(input_ids), cat(attention_mask), cat(text_image_index))


@torch.no_grad()
def encode_eval_set(model, loader, max_images: int = 0, batch_size: int = 64) -> EncodedEvalSet:
    """Run the vision tower once per image of this rank's share and the text encoder once per caption.

    The loader yields one row per (image, caption) with `image_index`; under several ranks each rank's loader
    yields a disjoint share of the images with all their captions (what epic.data.build_eval_loader does). The
    captions (token ids, cheap) are all-gathered and every rank encodes all of them; the images stay where they
    were encoded. `image_index` may have gaps (undecodable samples are skipped): rows are the sorted distinct
    indices. `max_images` > 0 keeps only images with image_index < max_images.
    """
    device, _ = _model_device_dtype(model)
    local_index, local_embeds, ids, mask, text_index = _read_local_share(model, loader, max_images, batch_size)
    shares = _all_gather_objects((local_index, ids, mask, text_index))
    all_index = torch.cat([s[0] for s in shares])
    if all_index.unique().numel() != all_index.numel():
        raise ValueError("the same image_index reached several ranks: each rank's eval loader must yield its own "
                         "share of the images (build it with epic.data.build_eval_loader(..., rank, world_size))")
    if all_index.numel() == 0:
        raise ValueError("the eval loader yielded no rows: check the eval shards (data.val_shards / --data)")
    distinct = all_index.sort().values  # row r <-> image_index distinct[r]
    to_row = lambda index: torch.searchsorted(distinct, index)  # noqa: E731
    image_rows = to_row(local_index)
    order = image_rows.argsort()
    input_ids = torch.cat([s[1] for s in shares]).to(device)
    attention_mask = torch.cat([s[2] for s in shares]).to(device)
    text_embeds = torch.cat([model.encode_text(input_ids[s:s + batch_size], attention_mask[s:s + batch_size])
                             for s in range(0, input_ids.shape[0], batch_size)])
    if local_embeds:
        image_embeds = torch.cat(local_embeds)[order.to(device)]
    else:  # this rank got no image: an empty block with the right trailing shape
        probe = model.encode_image(torch.zeros(1, 3, *_image_hw(model), device=device,
                                               dtype=_model_device_dtype(model)[1]))
        image_embeds = probe[:0]
    return EncodedEvalSet(image_ids=image_rows[order], image_embeds=image_embeds, num_images=distinct.numel(),
                          text_embeds=text_embeds, input_ids=input_ids, attention_mask=attention_mask,
                          text_to_image=to_row(torch.cat([s[3] for s in shares])))


def _image_hw(model) -> tuple[int, int]:
    size = getattr(getattr(model, "config", None), "image_size", None)
    if size is None:
        raise ValueError("this rank received no eval image and the model has no config.image_size to size an "
                         "empty block; use fewer ranks than eval images")
    return size, size


# ----------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------
def default_pair_score(model, cls_feats: torch.Tensor) -> torch.Tensor:
    """The raw ITM "match" logit itm_score(cls_feats)[:, 1] (fp32): what a pretrained model is ranked by, since
    rank_output is initialised from that row (weight and bias) before any fine-tuning. Not log p(match): the
    log-softmax subtracts a per-pair log-sum-exp and so reorders pairs."""
    return model.itm_score(cls_feats)[:, 1].float()


@torch.no_grad()
def score_pairs(model, data: EncodedEvalSet, local_image: torch.Tensor, text: torch.Tensor,
                batch_size: int) -> torch.Tensor:
    """Fusion + ITM for the pairs (data.image_embeds[local_image[j]], caption text[j]); returns [P] fp32 scores."""
    pair_score = getattr(model, "pair_score", None) or (lambda feats: default_pair_score(model, feats))
    device = data.text_embeds.device
    out = []
    for start in range(0, local_image.numel(), batch_size):
        img = local_image[start:start + batch_size].to(device)
        txt = text[start:start + batch_size].to(device)
        result = model.infer(input_ids=data.input_ids[txt], attention_mask=data.attention_mask[txt],
                             image_embeds=data.image_embeds[img], text_embeds=data.text_embeds[txt])
        out.append(pair_score(result["cls_feats"]).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def first_stage_embeddings(model, data: EncodedEvalSet) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit vectors for the shortlist: (this rank's images [I_local, D], all texts [T, D]) from the family's
    ``retrieval_embeddings`` (see the module doc)."""
    image_vec, text_vec = model.retrieval_embeddings(data.image_embeds, data.text_embeds, data.attention_mask)
    return F.normalize(image_vec.float(), dim=-1).cpu(), F.normalize(text_vec.float(), dim=-1).cpu()


def _all_gather_rows(local_rows: torch.Tensor, local_ids: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Assemble the full [num_rows, C] matrix from every rank's rows (`local_ids` says which rows it holds)."""
    rank, world = _dist_info()
    full = torch.empty(num_rows, local_rows.shape[1], dtype=local_rows.dtype)
    if world == 1:
        full[local_ids] = local_rows
        return full
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    counts = [int(n) for n in _all_gather_objects(local_ids.numel())]
    padded = torch.zeros(max(counts), local_rows.shape[1], dtype=local_rows.dtype, device=device)
    padded[:local_rows.shape[0]] = local_rows.to(device)
    padded_ids = torch.full((max(counts),), -1, dtype=torch.long, device=device)
    padded_ids[:local_ids.numel()] = local_ids.to(device)
    rows = [torch.empty_like(padded) for _ in range(world)]
    ids = [torch.empty_like(padded_ids) for _ in range(world)]
    dist.all_gather(rows, padded)
    dist.all_gather(ids, padded_ids)
    for count, block, block_ids in zip(counts, rows, ids):
        full[block_ids[:count].cpu()] = block[:count].cpu()
    return full


def shortlist_mask(image_vec_all: torch.Tensor, text_vec: torch.Tensor, k_test: int) -> torch.Tensor:
    """[I, T] bool: pair is among the image's k_test best texts or the text's k_test best images."""
    sim = image_vec_all @ text_vec.T
    mask = torch.zeros_like(sim, dtype=torch.bool)
    k_txt = min(k_test, sim.shape[1])
    k_img = min(k_test, sim.shape[0])
    mask.scatter_(1, sim.topk(k_txt, dim=1).indices, True)  # TR shortlist per image
    mask.scatter_(0, sim.topk(k_img, dim=0).indices, True)  # IR shortlist per text
    return mask


@torch.no_grad()
def retrieval_scores(model, data: EncodedEvalSet, k_test: int = 0, batch_size: int = 64) -> torch.Tensor:
    """The full [I, T] score matrix on every rank; pairs outside the shortlist (k_test > 0) get -inf."""
    num_texts = data.text_embeds.shape[0]
    if k_test > 0:
        image_vec, text_vec = first_stage_embeddings(model, data)
        image_vec_all = _all_gather_rows(image_vec, data.image_ids, data.num_images)
        wanted = shortlist_mask(image_vec_all, text_vec, k_test)[data.image_ids]  # this rank's rows
    else:
        wanted = torch.ones(data.image_ids.numel(), num_texts, dtype=torch.bool)
    local_image, text = wanted.nonzero(as_tuple=True)
    local_scores = torch.full((data.image_ids.numel(), num_texts), float("-inf"))
    local_scores[local_image, text] = score_pairs(model, data, local_image, text, batch_size)
    return _all_gather_rows(local_scores, data.image_ids, data.num_images)


@torch.no_grad()
def evaluate_retrieval(model, loader, k_test: int = 0, max_images: int = 0, batch_size: int = 64) -> dict:
    """Encode once, score, and return `tr_r1 tr_r5 tr_r10 ir_r1 ir_r5 ir_r10 r_mean` (percent) plus set sizes."""
    was_training = model.training
    model.eval()
    try:
        data = encode_eval_set(model, loader, max_images=max_images, batch_size=batch_size)
        scores = retrieval_scores(model, data, k_test=k_test, batch_size=batch_size)
    finally:
        model.train(was_training)
    metrics = recall_metrics(scores, data.text_to_image)
    metrics.update(num_images=data.num_images, num_texts=int(data.text_to_image.numel()), k_test=k_test)
    return metrics
