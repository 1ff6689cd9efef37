"""Training and evaluation loaders over webdataset shards.

Training stream (exactly resumable, re-splittable across world sizes)
--------------------------------------------------------------------
The run has S data streams, a fixed property of the run (`streams`, saved with the position) that does not depend
on the number of ranks. Global micro-batch j (counting the micro-batches of every rank, j = n * world_size + rank
for a rank's n-th micro-batch) comes from stream j % S, so rank r owns the streams s with s % world_size == r
(S / world_size of them, used round-robin; its DataLoader workers share them out, worker w taking local streams
w, w + W, ...). A stream is a pure function of (seed, s, S) and of how many samples it has drawn:
  * shard visits: source s's shards are visited in seeded permutations, one per epoch of that source; the global
    visit sequence perm_0 ++ perm_1 ++ ... is dealt round-robin to the S streams, so concurrent streams read
    different shards (no duplicate samples in a global batch while shards outnumber streams);
  * each stream keeps `shards_open` shards open per source and reads them sequentially;
  * raw draw n picks the source by weight (per sample, so weights are sample shares whatever the shard sizes),
    stratified: each block of SOURCE_BLOCK draws holds every source floor or ceil(block * share) times
    (systematic sampling with an offset seeded by (seed, s, block)), in a seeded random order, so the shares are
    exact to ~1/SOURCE_BLOCK at any length, not only on average; an open shard is drawn uniformly from an RNG
    seeded with (seed, s, n) (`draw`), which also seeds the image augmentation; batch b's MLM masking is seeded
    with (seed, s, b).
  * the sample unit (data.sample_unit). "caption" (default, as METER and ALBEF index their data): a sample is an
    (image, caption) pair; source weights default to caption counts (counts.json beside the shards) and an epoch
    is one pass over all captions. A shard is read image by image (so a batch never holds one image twice), and
    the e-th pass over a source's shards gives image k the caption perm_k[e mod c_k] of a permutation seeded by
    (seed, source, key): over c passes every caption of an image with c captions comes once, and the passes over
    a source come as often as its caption share demands. "image": a sample is an image with one caption drawn
    uniformly per visit (seeded by the draw); weights default to image counts. Both are pure functions of
    (seed, stream, position): nothing is added to the position. Each batch carries `caption_index` [B].
Batching happens inside the worker and the DataLoader collates nothing (batch_size=None), so its round-robin
order is fixed. Every batch carries its stream's position after it (JSON-able: samples drawn, batches made, per
source the next visit and (visit, offset) of each open shard) and the skip counts since the previous batch; the
TrainLoader keeps the position of the last batch *yielded* per stream, so prefetched batches are never counted.
The saved position names each stream by its global index, so the positions of all ranks together
(`merge_train_states`) can be dealt to another number of ranks (elastic resume): no sample is skipped or repeated
as long as S is a multiple of world_size x workers. Resuming restarts each stream at its saved position
(reopening the open shards and skipping `offset` samples in each).

Evaluation
----------
A sequential pass over the val shards in order; raw sample i (counting every sample of every shard, in order)
goes to rank/worker part i % (world_size * W) and keeps `image_index = i`, so each image is seen once across
ranks and rows from different ranks can be merged by `image_index`. Each rank reads the whole (small) val set
but decodes only its own samples.
"""
from __future__ import annotations

import copy
import json
import os
import random
import zlib
from collections import Counter
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .shards import (Source, count_skips, decode_sample, epoch_length, expand_shard_spec, iter_raw_samples,
                     parse_sources)
from .text import load_tokenizer, mask_tokens_for_mlm, replacement_token_ids, tokenize_captions
from .transforms import TRAIN_CROP_SCALE, eval_transform, normalize, seeded_transform, train_transform
from .wwm import whole_word_mask

STATE_VERSION = 2  # 2: positions keyed by global stream index, `streams` fixed per run
# Purposes folded into seeds so the RNG streams of different decisions never coincide.
_SHARD_ORDER, _DRAW, _MLM, _EVAL_MLM, _CAPTION_ORDER, _SOURCE_BLOCK = 1, 2, 3, 4, 5, 6
SOURCE_BLOCK = 1024  # draws per stratified block of source choices


def _seed(*keys: int) -> int:
    """A 63-bit seed derived from integer keys (numpy SeedSequence hashing)."""
    words = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def collate_rows(keys, pixels, captions, content_words, tokenizer, max_text_len, mlm_probability, replacement_ids,
                 generator, caption_indices, whole_word_masking: bool = False, mlm_masking: str = "random",
                 mlm_max_masks: int = 8) -> dict:
    """Rows -> the batch dict of docs/CONTRACTS.md (pixel_values, text fields, MLM fields, content_mask, keys,
    caption_index: which of the sample's captions each row holds). ``whole_word_masking`` (ViLT's MLM) selects
    whole words of the tokenizer's pre-tokenizer (data/wwm.py); ``mlm_masking="xvlm"``: X-VLM's masking
    (data/xvlm_masking.py: at most ``mlm_max_masks`` per caption, whole words, skip-grams)."""
    if mlm_masking not in ("random", "xvlm"):
        raise ValueError(f"mlm_masking must be 'random' or 'xvlm' (saliency masking happens in the objective), "
                         f"got {mlm_masking!r}")
    batch = {"pixel_values": torch.stack(pixels).float()}
    word_ids = whole_word_masking or mlm_masking == "xvlm"
    batch.update(tokenize_captions(tokenizer, captions, content_words, max_text_len, with_word_ids=word_ids))
    if mlm_masking == "xvlm":
        batch["mlm_input_ids"], batch["mlm_labels"] = xvlm_mask_rows(batch, batch.pop("word_ids"), tokenizer,
                                                                     mlm_probability, mlm_max_masks, generator)
    elif whole_word_masking:
        batch["mlm_input_ids"], batch["mlm_labels"] = whole_word_mask(
            batch["input_ids"], batch.pop("word_ids"), tokenizer.mask_token_id, replacement_ids, mlm_probability,
            generator)
    else:
        batch["mlm_input_ids"], batch["mlm_labels"] = mask_tokens_for_mlm(
            batch["input_ids"], batch["special_tokens_mask"], tokenizer.mask_token_id, replacement_ids, mlm_probability,
            generator)
    batch["keys"] = list(keys)
    batch["caption_index"] = torch.tensor(list(caption_indices), dtype=torch.long)
    # host ints, the real (caption) tokens per row: counts the step needs, e.g. EPIC's M = sum ceil(ratio * len_i),
    # without reading the device
    batch["real_lengths"] = (batch["attention_mask"].bool() & ~batch["special_tokens_mask"]).sum(dim=1).tolist()
    return batch


def xvlm_mask_rows(batch: dict, word_ids: torch.Tensor, tokenizer, mlm_probability: float, max_masks: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """X-VLM's masking of a tokenised batch; words are the tokenizer's pre-tokenizer words (``word_ids``, as ViLT's
    whole-word masking reads them), the draws come from ``generator``'s seed (one Python RNG per batch)."""
    from .xvlm_masking import mask_batch

    previous = torch.cat([torch.full_like(word_ids[:, :1], -2), word_ids[:, :-1]], dim=1)
    word_start = (word_ids != previous) | (word_ids < 0)
    return mask_batch(batch["input_ids"], batch["special_tokens_mask"], random.Random(generator.initial_seed()),
                      tokenizer.mask_token_id, len(tokenizer), mlm_probability, max_masks, word_start=word_start)


# -------------------------------------------------------------------------------------------- training stream
def shard_for_visit(source_index: int, num_shards: int, seed: int, stream: int, num_streams: int, visit: int) -> int:
    """Shard index of a stream's visit: global visit g = stream + visit * T in the concatenated epoch permutations."""
    g = stream + visit * num_streams
    epoch, position = divmod(g, num_shards)
    return int(np.random.default_rng(_seed(seed, _SHARD_ORDER, source_index, epoch)).permutation(num_shards)[position])


def visit_pass(num_shards: int, stream: int, num_streams: int, visit: int) -> int:
    """Which pass over a source's shards a stream's visit belongs to (the epoch of its shard permutation)."""
    return (stream + visit * num_streams) // num_shards


def _key_number(key: str) -> int:
    return zlib.crc32(key.encode("utf-8"))


def choose_caption(unit: str, num_captions: int, seed: int, source: int, key: str, shard_pass: int,
                   sample_seed: int) -> int:
    """The caption a visit uses. "caption": the shard_pass-th entry (mod c) of the sample's seeded caption
    permutation, so c passes show each caption once; "image": uniform per visit, from the draw's seed."""
    if num_captions == 1:
        return 0
    if unit == "image":
        return random.Random(sample_seed).randrange(num_captions)
    cycle, position = divmod(shard_pass, num_captions)
    order = np.random.default_rng(_seed(seed, _CAPTION_ORDER, source, _key_number(key), cycle)).permutation(num_captions)
    return int(order[position])


def initial_position(num_sources: int, shards_open: int) -> dict:
    return {"samples": 0, "batches": 0,
            "sources": [{"next_visit": shards_open, "slots": [[k, 0] for k in range(shards_open)]} for _ in range(num_sources)]}


class SampleStream:
    """One (rank, worker) stream of raw samples; `position` is its whole state."""

    def __init__(self, sources: Sequence[Source], seed: int, stream: int, num_streams: int, position: dict):
        self.sources, self.seed, self.stream, self.num_streams = sources, seed, stream, num_streams
        self.position = position
        self.shards_open = len(position["sources"][0]["slots"])
        total = sum(s.weight for s in sources)
        self.weights = np.array([s.weight / total for s in sources])
        self.skips: Counter = Counter()
        self._open: dict = {}
        self._block = None  # (block number, its source choices): derived from the seed, not part of the position

    def draw(self, n: int) -> tuple[int, int, int]:
        """Raw draw n of this stream: (source, open-shard slot, sample seed), a pure function of (seed, stream, n)."""
        rng = np.random.default_rng(_seed(self.seed, _DRAW, self.stream, n))
        slot = int(rng.integers(self.shards_open))
        return self.source_of_draw(n), slot, int(rng.integers(2**62))

    def source_of_draw(self, n: int) -> int:
        """The source of draw n: systematic sampling of the weights over its block of draws, randomly ordered."""
        if len(self.sources) == 1:
            return 0
        block, index = divmod(n, SOURCE_BLOCK)
        if self._block is None or self._block[0] != block:
            rng = np.random.default_rng(_seed(self.seed, _SOURCE_BLOCK, self.stream, block))
            points = rng.random() + np.arange(SOURCE_BLOCK)  # E[count of s] = SOURCE_BLOCK * weight_s exactly
            bounds = np.cumsum(self.weights) * SOURCE_BLOCK
            bounds[-1] = SOURCE_BLOCK + 1.0  # rounding of the cumulative sum never leaves a point unassigned
            self._block = (block, rng.permutation(np.searchsorted(bounds, points, side="right")))
        return int(self._block[1][index])

    def next_raw(self) -> tuple[dict, int, int, int]:
        """The next raw sample, its seed (augmentation, per-image caption choice), its source and shard pass."""
        source, slot, sample_seed = self.draw(self.position["samples"])
        raw = self._next_from_slot(source, slot)
        visit = self.position["sources"][source]["slots"][slot][0]
        shard_pass = visit_pass(len(self.sources[source].shards), self.stream, self.num_streams, visit)
        self.position["samples"] += 1
        return raw, sample_seed, source, shard_pass

    def _url(self, source: int, visit: int) -> str:
        shards = self.sources[source].shards
        return shards[shard_for_visit(source, len(shards), self.seed, self.stream, self.num_streams, visit)]

    def _reopen(self, source: int, slot: int):
        visit, offset = self.position["sources"][source]["slots"][slot]
        samples = iter_raw_samples(self._url(source, visit), self.skips)
        for _ in range(offset):  # resume inside the shard: skip what this visit already produced
            if next(samples, None) is None:
                break
        return samples

    def _next_from_slot(self, source: int, slot: int) -> dict:
        state = self.position["sources"][source]
        max_empty_visits = max(16, 2 * len(self.sources[source].shards))
        for _ in range(max_empty_visits):
            if (source, slot) not in self._open:
                self._open[(source, slot)] = self._reopen(source, slot)
            raw = next(self._open[(source, slot)], None)
            if raw is not None:
                state["slots"][slot][1] += 1
                return raw
            del self._open[(source, slot)]  # shard exhausted: the slot takes the stream's next visit
            state["slots"][slot] = [state["next_visit"], 0]
            state["next_visit"] += 1
        raise RuntimeError(
            f"source '{self.sources[source].name}': {max_empty_visits} shard visits in a row gave no samples "
            f"(skips so far: {dict(self.skips)}); its shards are empty or unreadable")

    def pop_skips(self) -> Counter:
        # copy and clear in place: the open shards' readers hold this very Counter and add to it when they end
        # (a truncated tar is counted when its reader reaches the cut, possibly several batches later)
        skips = Counter(self.skips)
        self.skips.clear()
        return skips


def round_robin(iterators):
    """a0, b0, c0, a1, b1, ... from infinite iterators."""
    while True:
        for it in iterators:
            yield next(it)


class TrainStream(IterableDataset):
    """Batches of the training stream, built inside each DataLoader worker (see the module docstring)."""

    def __init__(self, sources, tokenizer, *, image_size, max_text_len, batch_size, seed, rank, world_size,
                 streams, positions, first_stream, shards_open, mlm_probability, randaugment, crop_scale,
                 max_consecutive_skips, sample_unit="caption", whole_word_masking=False, normalization="clip",
                 mlm_masking="random", mlm_max_masks=8):
        super().__init__()
        self.sample_unit, self.normalization = sample_unit, normalization
        self.sources, self.tokenizer = sources, tokenizer
        self.image_size, self.max_text_len, self.batch_size = image_size, max_text_len, batch_size
        self.seed, self.rank, self.world_size, self.streams = seed, rank, world_size, streams
        self.streams_per_rank = streams // world_size
        self.positions, self.first_stream = positions, first_stream
        self.shards_open, self.mlm_probability = shards_open, mlm_probability
        self.randaugment, self.crop_scale, self.max_consecutive_skips = randaugment, crop_scale, max_consecutive_skips
        self.whole_word_masking = whole_word_masking
        self.mlm_masking, self.mlm_max_masks = mlm_masking, mlm_max_masks

    def stream_index(self, local: int) -> int:
        """Global index of this rank's local stream `local`: the streams s with s % world_size == rank."""
        return self.rank + local * self.world_size

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if self.streams_per_rank % workers:
            raise RuntimeError(f"{self.streams_per_rank} streams per rank cannot be shared by {workers} workers")
        # The DataLoader hands out worker w's k-th batch as batch w + k * workers (from first_stream on).
        mine = [(self.first_stream + worker + k * workers) % self.streams_per_rank
                for k in range(self.streams_per_rank // workers)]
        return round_robin([self._batches(local, copy.deepcopy(self.positions[local])
                                          or initial_position(len(self.sources), self.shards_open))
                            for local in mine])

    def _batches(self, local: int, position: dict):
        stream_index = self.stream_index(local)
        stream = SampleStream(self.sources, self.seed, stream_index, self.streams, position)
        transform = train_transform(self.image_size, self.randaugment, self.crop_scale, self.normalization)
        replacement_ids = replacement_token_ids(self.tokenizer)
        skipped_in_a_row = 0
        while True:
            keys, pixels, captions, flags, chosen, skips = [], [], [], [], [], Counter()
            shard_urls = []  # which shard each row came from: with caption_index, the saliency cache's key
            while len(keys) < self.batch_size:
                raw, sample_seed, source, shard_pass = stream.next_raw()
                sample = decode_sample(raw)
                if isinstance(sample, str):
                    skips[sample] += 1
                    skipped_in_a_row += 1
                    if skipped_in_a_row > self.max_consecutive_skips:
                        raise RuntimeError(
                            f"{skipped_in_a_row} samples in a row were unusable (skips: {dict(skips + stream.skips)}); "
                            "check the shards with tools/inspect_data.py")
                    continue
                skipped_in_a_row = 0
                choice = choose_caption(self.sample_unit, len(sample.captions), self.seed, source, sample.key,
                                        shard_pass, sample_seed)
                chosen.append(choice)
                keys.append(sample.key)
                pixels.append(seeded_transform(transform, sample.image, sample_seed))
                captions.append(sample.captions[choice])
                flags.append(sample.content_words[choice])
                shard_urls.append(str(raw.get("__url__", "")))
            generator = torch.Generator().manual_seed(_seed(self.seed, _MLM, stream_index, position["batches"]))
            batch = collate_rows(keys, pixels, captions, flags, self.tokenizer, self.max_text_len,
                                 self.mlm_probability, replacement_ids, generator, chosen, self.whole_word_masking,
                                 self.mlm_masking, self.mlm_max_masks)
            batch["shards"] = shard_urls
            position["batches"] += 1
            skips.update(stream.pop_skips())
            batch["_stream"] = {"stream": local, "position": copy.deepcopy(position), "skips": dict(skips)}
            yield batch


def check_streams(streams: int, world_size: int, num_workers: int) -> None:
    """S streams must deal evenly to the ranks, and each rank's share evenly to its DataLoader workers."""
    per_step = world_size * max(1, num_workers)
    if streams < 1 or streams % per_step:
        raise ValueError(
            f"data.streams={streams} is not a multiple of world size ({world_size}) x data loader workers "
            f"({max(1, num_workers)}, 0 counts as 1) = {per_step}. The number of streams is fixed for a run (it is "
            f"saved with the checkpoint); resume on a number of ranks that divides it, or set data.num_workers so "
            f"that it divides data.streams / world size.")


class TrainLoader:
    """Iterable of training batches with an exact, JSON-able position: state_dict() / load_state_dict()."""

    def __init__(self, sources: Sequence[Source], tokenizer, *, image_size, max_text_len, batch_size, num_workers,
                 seed, rank, world_size, mlm_probability, randaugment, crop_scale, shards_open, pin_memory,
                 prefetch_factor, max_consecutive_skips, multiprocessing_context=None, streams=None,
                 sample_unit="caption", whole_word_masking=False, normalization="clip", mlm_masking="random",
                 mlm_max_masks=8):
        streams = streams or world_size * max(1, num_workers)
        check_streams(streams, world_size, num_workers)
        self.sources, self.tokenizer = list(sources), tokenizer
        self.num_workers, self.streams, self.streams_per_rank = num_workers, streams, streams // world_size
        self.rank, self.world_size = rank, world_size
        self.pin_memory, self.prefetch_factor, self.multiprocessing_context = pin_memory, prefetch_factor, multiprocessing_context
        self._stream_args = dict(image_size=image_size, max_text_len=max_text_len, batch_size=batch_size, seed=seed,
                                 rank=rank, world_size=world_size, streams=streams,
                                 shards_open=shards_open, mlm_probability=mlm_probability, randaugment=randaugment,
                                 crop_scale=tuple(crop_scale), max_consecutive_skips=max_consecutive_skips,
                                 sample_unit=sample_unit, whole_word_masking=whole_word_masking,
                                 normalization=normalization, mlm_masking=mlm_masking, mlm_max_masks=mlm_max_masks)
        self._positions: list = [None] * self.streams_per_rank
        self._batches = 0
        self._skips: Counter = Counter()

    def __iter__(self):
        """Batches from the current position on, forever (a new iterator continues where the last one stopped)."""
        dataset = TrainStream(self.sources, self.tokenizer, positions=list(self._positions),
                              first_stream=self._batches % self.streams_per_rank, **self._stream_args)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            prefetch_factor=self.prefetch_factor if self.num_workers else None,
                            multiprocessing_context=self.multiprocessing_context if self.num_workers else None,
                            generator=torch.Generator())  # DataLoader draws a base seed; never from the global RNG
        for batch in loader:
            meta = batch.pop("_stream")
            expected = self._batches % self.streams_per_rank
            if meta["stream"] != expected:
                raise RuntimeError(f"batch {self._batches} came from stream {meta['stream']}, expected {expected}")
            self._positions[meta["stream"]] = meta["position"]
            self._skips.update(meta["skips"])
            self._batches += 1
            yield batch

    @property
    def batches_consumed(self) -> int:
        return self._batches

    def global_micro_batch(self, local: int) -> int:
        """Global index j of this rank's local micro-batch `local` (global micro-batch j comes from stream j % S)."""
        return local * self.world_size + self.rank

    def skip_counts(self) -> dict:
        """Samples and shards skipped so far (this rank), by reason; includes those before a resume."""
        return count_skips(self._skips)

    def _identity(self) -> dict:
        """The settings a saved position is only valid with (the world size is not one of them)."""
        a = self._stream_args
        return {"seed": a["seed"], "streams": self.streams, "batch_size": a["batch_size"],
                "shards_open": a["shards_open"], "sample_unit": a["sample_unit"],
                "source_draw": f"stratified-{SOURCE_BLOCK}" if len(self.sources) > 1 else "single",
                "sources": [[s.name, len(s.shards), s.weight] for s in self.sources]}

    @property
    def epoch_samples(self) -> Optional[int]:
        """Samples in one epoch (one pass over all captions, or images with sample_unit=image); None if uncounted."""
        return epoch_length(self.sources, self._stream_args["sample_unit"])

    def state_dict(self) -> dict:
        """Position after the last batch yielded (JSON-able; store it per rank, e.g. in DeepSpeed client_state)."""
        positions = {str(self.rank + local * self.world_size): copy.deepcopy(p)
                     for local, p in enumerate(self._positions) if p is not None}
        return {"version": STATE_VERSION, **self._identity(), "rank": self.rank, "world_size": self.world_size,
                "batches": self._batches, "positions": positions, "skips": dict(self._skips)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position: this rank's own state_dict(), or merge_train_states() of all ranks of
        a run with another world size. The loader must be built with the same seed, number of streams, batch
        size and sources (else the stream would differ and the error says which setting changed)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state has version {state.get('version')!r}, expected {STATE_VERSION} "
                             f"(written by an older epic: resume it with that version, or start a fresh stream)")
        saved = json.loads(json.dumps({k: state.get(k) for k in self._identity()}))  # tuples -> lists, as saved
        changed = [f"{k}: saved {saved[k]!r}, now {v!r}" for k, v in self._identity().items() if saved[k] != v]
        if changed:
            raise ValueError(
                "cannot resume the data stream exactly, the loader settings changed (" + "; ".join(changed) + "). "
                "Rebuild the loader with the saved settings, or start a fresh stream "
                "(state=None, ideally with a new seed so samples already seen are not replayed first).")
        if "global_batches" in state:  # merged: the micro-batches of the whole run, dealt to the new ranks
            total = int(state["global_batches"])
            if total % self.world_size:
                raise ValueError(f"the run stopped after {total} global micro-batches, which {self.world_size} "
                                 f"ranks cannot share out evenly")
            batches = total // self.world_size
        elif state.get("world_size") == self.world_size and state.get("rank") == self.rank:
            batches = int(state["batches"])
        else:
            raise ValueError(f"this is rank {state.get('rank')}'s data state of a world_size={state.get('world_size')} "
                             f"run; this loader is rank {self.rank} of world_size={self.world_size}. To resume on "
                             f"another number of ranks pass merge_train_states(<the states of all ranks>)")
        positions = state["positions"]
        self._positions = [copy.deepcopy(positions.get(str(self.rank + local * self.world_size)))
                           for local in range(self.streams_per_rank)]
        self._batches = batches
        self._skips = Counter(state.get("skips", {})) if state.get("rank", 0) == self.rank else Counter()


def merge_train_states(states: Sequence[dict]) -> dict:
    """The TrainLoader.state_dict() of every rank of one run -> one world-size independent position.

    Positions of all streams together; skip counts summed (the new rank 0 carries them); `global_batches`: the
    micro-batches the whole run consumed (each rank consumed the same number)."""
    states = list(states)
    if not states or any(not isinstance(s, dict) or "streams" not in s for s in states):
        raise ValueError("these data states cannot be re-split across ranks (not epic.data TrainLoader states "
                         "of version 2)")
    batches = {int(s["batches"]) for s in states}
    if len(batches) != 1:
        raise ValueError(f"the ranks consumed different numbers of micro-batches ({sorted(batches)}): not a "
                         f"state saved at an optimizer step")
    merged = {k: v for k, v in states[0].items() if k not in ("positions", "skips", "rank", "world_size", "batches")}
    merged["positions"] = {k: v for s in states for k, v in s["positions"].items()}
    merged["skips"] = dict(sum((Counter(s.get("skips", {})) for s in states), Counter()))
    merged["global_batches"] = batches.pop() * len(states)
    merged["rank"], merged["world_size"] = 0, None
    return merged


# ------------------------------------------------------------------------------------------------- evaluation
class EvalStream(IterableDataset):
    """One sequential pass over the eval shards; this rank/worker's share of images, one row per caption."""

    def __init__(self, shards, tokenizer, *, image_size, max_text_len, batch_size, rank, world_size, all_captions,
                 normalization="clip"):
        super().__init__()
        self.normalization = normalization
        self.shards, self.tokenizer = list(shards), tokenizer
        self.image_size, self.max_text_len, self.batch_size = image_size, max_text_len, batch_size
        self.rank, self.world_size, self.all_captions = rank, world_size, all_captions

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        part, parts = self.rank * workers + worker, self.world_size * workers
        transform = eval_transform(self.image_size, self.normalization)
        replacement_ids = replacement_token_ids(self.tokenizer)
        rows, skips, shard_skips, batch_no, image_index = [], Counter(), Counter(), 0, 0

        def emit(chunk):
            nonlocal batch_no
            keys, pixels, captions, flags, indices, caption_indices = zip(*chunk)
            generator = torch.Generator().manual_seed(_seed(0, _EVAL_MLM, part, batch_no))
            batch = collate_rows(keys, list(pixels), list(captions), list(flags), self.tokenizer, self.max_text_len,
                                 0.15, replacement_ids, generator, caption_indices)
            batch["image_index"] = torch.tensor(indices, dtype=torch.long)
            batch["_skips"] = dict(skips + (shard_skips if part == 0 else Counter()))
            skips.clear(), shard_skips.clear()
            batch_no += 1
            return batch

        for url in self.shards:
            for raw in iter_raw_samples(url, shard_skips):  # shard-level skips are reported by part 0 only
                index, image_index = image_index, image_index + 1
                if index % parts != part:
                    continue
                sample = decode_sample(raw)
                if isinstance(sample, str):
                    skips[sample] += 1
                    continue
                pixels = transform(sample.image)
                chosen = range(len(sample.captions)) if self.all_captions else range(1)
                rows.extend((sample.key, pixels, sample.captions[c], sample.content_words[c], index, c) for c in chosen)
                while len(rows) >= self.batch_size:
                    yield emit(rows[: self.batch_size])
                    rows = rows[self.batch_size:]
        if rows:
            yield emit(rows)
        if skips or (part == 0 and shard_skips):
            yield {"_skips": dict(skips + (shard_skips if part == 0 else Counter()))}


class EvalLoader:
    """Iterable over the eval set once per iteration; batches carry `image_index`; skip_counts() as in training."""

    def __init__(self, dataset: EvalStream, num_workers: int):
        self.dataset, self.num_workers = dataset, num_workers
        self._skips: Counter = Counter()

    def __iter__(self):
        self._skips = Counter()
        for batch in DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, generator=torch.Generator()):
            self._skips.update(batch.pop("_skips"))
            if "keys" in batch:
                yield batch

    def skip_counts(self) -> dict:
        return count_skips(self._skips)


# --------------------------------------------------------------------------------------------------- builders
def _check_common(image_size, max_text_len, batch_size, num_workers, rank, world_size) -> None:
    if image_size < 1 or batch_size < 1:
        raise ValueError(f"image_size and batch_size must be >= 1, got {image_size} and {batch_size}")
    if max_text_len < 3:
        raise ValueError(f"max_text_len must be >= 3 (<s>, one token, </s>), got {max_text_len}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def _tokenizer(tokenizer):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are forked after the tokenizer is used
    return load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer


def build_train_loader(sources, tokenizer, *, image_size: int, max_text_len: int, batch_size: int, num_workers: int,
                       seed: int, rank: int, world_size: int, mlm_probability: float = 0.15, randaugment: bool = True,
                       state: Optional[dict] = None, crop_scale=TRAIN_CROP_SCALE, shards_open: int = 2,
                       pin_memory: bool = False, prefetch_factor: int = 2, max_consecutive_skips: int = 100_000,
                       multiprocessing_context=None, sample_unit: str = "caption", streams: Optional[int] = None,
                       whole_word_masking: bool = False, normalization: str = "clip", mlm_masking: str = "random",
                       mlm_max_masks: int = 8) -> TrainLoader:
    """The infinite, exactly resumable training loader of one rank.

    sources: a shard spec, or a list of specs / dicts {shards, weight="auto", name} (auto: the caption count, or
    image count for sample_unit="image", from counts.json); tokenizer: a HF fast tokenizer or its folder; state: a
    TrainLoader.state_dict() to resume from; normalization: data.normalization (epic.data.transforms). Missing
    shards (and counts that weight auto needs) fail here.
    """
    _check_common(image_size, max_text_len, batch_size, num_workers, rank, world_size)
    normalize(normalization)  # an unknown name fails here, not in a worker
    if shards_open < 1:
        raise ValueError(f"shards_open must be >= 1, got {shards_open}")
    loader = TrainLoader(parse_sources(sources, sample_unit), _tokenizer(tokenizer), image_size=image_size, max_text_len=max_text_len,
                         batch_size=batch_size, num_workers=num_workers, seed=seed, rank=rank, world_size=world_size,
                         mlm_probability=mlm_probability, randaugment=randaugment, crop_scale=crop_scale,
                         shards_open=shards_open, pin_memory=pin_memory, prefetch_factor=prefetch_factor,
                         max_consecutive_skips=max_consecutive_skips, multiprocessing_context=multiprocessing_context,
                         sample_unit=sample_unit, whole_word_masking=whole_word_masking, streams=streams or (state or {}).get("streams"),
                         normalization=normalization, mlm_masking=mlm_masking, mlm_max_masks=mlm_max_masks)
    if state is not None:
        loader.load_state_dict(state)
    return loader


def build_eval_loader(shards, tokenizer, *, image_size: int, max_text_len: int, batch_size: int, num_workers: int = 0,
                      rank: int = 0, world_size: int = 1, all_captions: bool = True,
                      normalization: str = "clip") -> EvalLoader:
    """Sequential, non-resampled loader over eval shards: each image once across ranks, one row per (image, caption)
    (or per image with its first caption when all_captions=False), with `image_index` naming the image."""
    _check_common(image_size, max_text_len, batch_size, num_workers, rank, world_size)
    normalize(normalization)
    dataset = EvalStream(expand_shard_spec(shards, name="eval shards"), _tokenizer(tokenizer), image_size=image_size,
                         max_text_len=max_text_len, batch_size=batch_size, rank=rank, world_size=world_size,
                         all_captions=all_captions, normalization=normalization)
    return EvalLoader(dataset, num_workers)
