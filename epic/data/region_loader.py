"""The exactly resumable training loader of X-VLM's region batches (its RegionTextJsonDataset + collate).

It reuses the caption loader's sample streams (epic.data.loader.SampleStream: seeded shard visits, per-draw seeds,
a JSON-able position per (rank, worker) stream) over region shards (tools/make_shards.py --regions, or the shapes
world), and makes each batch as X-VLM does: ``max_images`` images with regions (samples without are skipped and
counted), each cropped around one of its regions (epic.data.regions.region_example, seeded by the sample's draw),
then ``batch_size`` (caption, box) rows with X-VLM's MLM masking (seeded by the stream and batch number). The
position after every batch travels with it, so ``state_dict()`` / ``load_state_dict()`` resume the region stream
exactly, like the caption loader's.
"""
from __future__ import annotations

import copy
import json
import random
from collections import Counter
from typing import Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision import transforms as T

from .loader import TrainLoader, _check_common, _seed, _tokenizer, initial_position
from .loader import SampleStream
from .regions import collate_region_batch, decode_region_sample, region_example
from .shards import parse_sources
from .transforms import normalize

REGION_STATE_VERSION = 1

_REGION_BATCH = 11  # seed purpose, distinct from the caption loader's


def region_to_tensor(normalization: str = "clip") -> T.Compose:
    """X-VLM's box_transform after the region crop and resize: no further geometry (it would move the boxes), then
    ``data.normalization`` (X-VLM: CLIP's mean/std), as the caption batches of the same run."""
    return T.Compose([T.ToTensor(), normalize(normalization)])


class RegionStream(IterableDataset):
    def __init__(self, sources, tokenizer, *, image_size, grid, max_text_len, batch_size, max_images, max_regions,
                 min_perc_in_image, hflip, mask_prob, max_masks, seed, rank, world_size, streams_per_rank, positions,
                 first_stream, shards_open, max_consecutive_skips, normalization="clip"):
        super().__init__()
        self.normalization = normalization
        self.sources, self.tokenizer = sources, tokenizer
        self.args = dict(image_size=image_size, grid=grid, max_regions=max_regions, min_perc_in_image=min_perc_in_image,
                         hflip=hflip)
        self.max_text_len, self.batch_size, self.max_images = max_text_len, batch_size, max_images
        self.mask_prob, self.max_masks = mask_prob, max_masks
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.streams_per_rank, self.positions, self.first_stream = streams_per_rank, positions, first_stream
        self.shards_open, self.max_consecutive_skips = shards_open, max_consecutive_skips

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if workers != self.streams_per_rank:
            raise RuntimeError(f"RegionStream expects {self.streams_per_rank} workers, got {workers}")
        local = (worker + self.first_stream) % self.streams_per_rank
        position = copy.deepcopy(self.positions[local]) or initial_position(len(self.sources), self.shards_open)
        return self._batches(local, position)

    def _batches(self, local: int, position: dict):
        stream_index = self.rank * self.streams_per_rank + local
        stream = SampleStream(self.sources, self.seed, stream_index, self.world_size * self.streams_per_rank, position)
        to_tensor = region_to_tensor(self.normalization)
        in_a_row = 0
        while True:
            examples, skips = [], Counter()
            while len(examples) < self.max_images:
                raw, sample_seed = stream.next_raw()[:2]
                decoded = decode_region_sample(raw)
                rows = None
                if not isinstance(decoded, str):
                    image, regions, captions = decoded
                    crop, rows = region_example(image, regions, captions, random.Random(sample_seed), **self.args)
                if isinstance(decoded, str) or not rows:
                    skips[decoded if isinstance(decoded, str) else "no_region_in_crop"] += 1
                    in_a_row += 1
                    if in_a_row > self.max_consecutive_skips:
                        raise RuntimeError(f"{in_a_row} samples in a row gave no region rows (skips: {dict(skips)}); "
                                           "are these region shards (tools/make_shards.py --regions)?")
                    continue
                in_a_row = 0
                examples.append((to_tensor(crop), rows))
            rng = random.Random(_seed(self.seed, _REGION_BATCH, stream_index, position["batches"]))
            batch = collate_region_batch(examples, self.tokenizer, self.max_text_len, rng, self.batch_size,
                                         self.mask_prob, self.max_masks)
            position["batches"] += 1
            skips.update(stream.pop_skips())
            batch["_stream"] = {"stream": local, "position": copy.deepcopy(position), "skips": dict(skips)}
            yield batch


class RegionTrainLoader(TrainLoader):
    """Iterable of region batches with the caption loader's exact, JSON-able position (state_dict / load_state_dict)."""

    def __init__(self, sources, tokenizer, *, image_size, grid, max_text_len, batch_size, max_images, max_regions,
                 min_perc_in_image, hflip, mask_prob, max_masks, num_workers, seed, rank, world_size, shards_open,
                 max_consecutive_skips, normalization="clip"):
        self.sources, self.tokenizer = list(sources), tokenizer
        self.num_workers, self.streams_per_rank = num_workers, max(1, num_workers)
        self.pin_memory, self.prefetch_factor, self.multiprocessing_context = False, 2, None
        self._stream_args = dict(image_size=image_size, grid=grid, max_text_len=max_text_len, batch_size=batch_size,
                                 max_images=max_images, max_regions=max_regions, min_perc_in_image=min_perc_in_image,
                                 hflip=hflip, mask_prob=mask_prob, max_masks=max_masks, seed=seed, rank=rank,
                                 world_size=world_size, streams_per_rank=self.streams_per_rank, shards_open=shards_open,
                                 max_consecutive_skips=max_consecutive_skips, normalization=normalization)
        self._positions: list = [None] * self.streams_per_rank
        self._batches = 0
        self._skips: Counter = Counter()

    def _identity(self) -> dict:
        a = self._stream_args
        return {"seed": a["seed"], "rank": a["rank"], "world_size": a["world_size"], "kind": "regions",
                "streams_per_rank": self.streams_per_rank, "batch_size": a["batch_size"], "max_images": a["max_images"],
                "shards_open": a["shards_open"], "sources": [[s.name, len(s.shards), s.weight] for s in self.sources]}

    def __iter__(self):
        dataset = RegionStream(self.sources, self.tokenizer, positions=list(self._positions),
                               first_stream=self._batches % self.streams_per_rank, **self._stream_args)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                            prefetch_factor=self.prefetch_factor if self.num_workers else None,
                            generator=torch.Generator())
        for batch in loader:
            meta = batch.pop("_stream")
            expected = self._batches % self.streams_per_rank
            if meta["stream"] != expected:
                raise RuntimeError(f"region batch {self._batches} came from stream {meta['stream']}, expected {expected}")
            self._positions[meta["stream"]] = meta["position"]
            self._skips.update(meta["skips"])
            self._batches += 1
            yield batch

    # Region streams are split per rank (same-world resume only; the caption loader's elastic re-split does not
    # apply to them), so their state keeps this rank's list of stream positions.
    def state_dict(self) -> dict:
        return {"version": REGION_STATE_VERSION, **self._identity(), "batches": self._batches,
                "positions": copy.deepcopy(self._positions), "skips": dict(self._skips)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != REGION_STATE_VERSION:
            raise ValueError(f"region loader state has version {state.get('version')!r}, expected "
                             f"{REGION_STATE_VERSION}")
        changed = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in self._identity().items()
                   if json_roundtrip(state.get(k)) != json_roundtrip(v)]
        if changed:
            raise ValueError("cannot resume the region stream exactly, the loader settings changed ("
                             + "; ".join(changed) + "); region streams resume only on the same world size")
        if len(state["positions"]) != self.streams_per_rank:
            raise ValueError(f"region loader state has {len(state['positions'])} stream positions, expected "
                             f"{self.streams_per_rank}")
        self._positions = copy.deepcopy(state["positions"])
        self._batches = int(state["batches"])
        self._skips = Counter(state.get("skips", {}))


def json_roundtrip(value):
    """Tuples -> lists, as a saved (JSON) state holds them."""
    return json.loads(json.dumps(value))


def build_region_loader(sources, tokenizer, *, image_size: int, grid: int, max_text_len: int, batch_size: int,
                        max_images: int, max_regions: int = 5, min_perc_in_image: float = 0.5, hflip: bool = True,
                        mask_prob: float = 0.25, max_masks: int = 8, num_workers: int = 0, seed: int = 0, rank: int = 0,
                        world_size: int = 1, state: Optional[dict] = None, shards_open: int = 2,
                        max_consecutive_skips: int = 10_000, normalization: str = "clip") -> RegionTrainLoader:
    """The region loader of one rank (X-VLM regions: batch_size rows from max_images images). ``hflip`` False for
    data whose captions name left and right (the shapes world); ``grid`` = the model's image_grid;
    ``normalization`` = data.normalization (the caption loader's: clip, imagenet or inception)."""
    _check_common(image_size, max_text_len, batch_size, num_workers, rank, world_size)
    normalize(normalization)  # an unknown name fails here, naming data.normalization, not later in a worker
    if max_images < 1 or max_regions < 1 or grid < 1:
        raise ValueError(f"need max_images, max_regions and grid >= 1, got {max_images}, {max_regions}, {grid}")
    loader = RegionTrainLoader(parse_sources(sources), _tokenizer(tokenizer), image_size=image_size, grid=grid,
                               max_text_len=max_text_len, batch_size=batch_size, max_images=max_images,
                               max_regions=max_regions, min_perc_in_image=min_perc_in_image, hflip=hflip,
                               mask_prob=mask_prob, max_masks=max_masks, num_workers=num_workers, seed=seed, rank=rank,
                               world_size=world_size, shards_open=shards_open,
                               max_consecutive_skips=max_consecutive_skips, normalization=normalization)
    if state is not None:
        loader.load_state_dict(state)
    return loader
