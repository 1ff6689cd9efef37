"""Elastic resume, data side: a run's global micro-batch sequence does not depend on how many ranks (and workers)
read it. Global micro-batch j comes from stream j % S; the positions of all ranks, merged, re-split to another world
size continue the same sequence (no sample skipped, none repeated): 2 ranks -> 1 rank (2 workers) -> 2 ranks."""
from __future__ import annotations

import json

import pytest
import torch

from epic.data import build_train_loader, shard_spec
from epic.data.loader import merge_train_states

STREAMS = 4
FIELDS = ("pixel_values", "input_ids", "mlm_input_ids", "mlm_labels")


def loader(world, *, rank, world_size, num_workers, state=None):
    return build_train_loader(shard_spec(world, "train"), world / "tokenizer", image_size=16, max_text_len=16,
                              batch_size=3, num_workers=num_workers, seed=11, rank=rank, world_size=world_size,
                              state=state, streams=STREAMS if state is None else None, shards_open=1)


def global_batches(loaders, per_rank):
    """Interleave the ranks' batches into global order (j = n * world + rank); the loaders' states after."""
    iters = [iter(l) for l in loaders]
    out = []
    for _ in range(per_rank):
        out.extend(next(it) for it in iters)
    return out, [json.loads(json.dumps(l.state_dict())) for l in loaders]


def assert_same(a, b):
    assert [x["keys"] for x in a] == [y["keys"] for y in b]
    for x, y in zip(a, b):
        for name in FIELDS:
            assert torch.equal(x[name], y[name]), name


def test_two_ranks_to_one_to_two_keeps_the_global_sequence(shapes_world):
    reference, _ = global_batches([loader(shapes_world, rank=0, world_size=1, num_workers=0)], 14)

    first, states = global_batches([loader(shapes_world, rank=r, world_size=2, num_workers=0) for r in range(2)], 3)
    one = loader(shapes_world, rank=0, world_size=1, num_workers=2, state=merge_train_states(states))
    second, states = global_batches([one], 4)  # 2 ranks -> 1 rank with 2 workers (2 of the 4 streams each)
    two = [loader(shapes_world, rank=r, world_size=2, num_workers=1, state=merge_train_states(states))
           for r in range(2)]
    third, _ = global_batches(two, 2)  # 1 -> 2 ranks

    resumed = first + second + third
    assert len(resumed) == 14
    assert_same(resumed, reference)
    keys = [k for b in resumed for k in b["keys"]]
    assert len(keys) == len(set(keys)) == 14 * 3  # 4 streams on 4 shards (one open each): none twice


def test_streams_must_divide_between_ranks_and_workers(shapes_world):
    with pytest.raises(ValueError, match=r"data.streams=4 is not a multiple of world size \(3\)"):
        loader(shapes_world, rank=0, world_size=3, num_workers=0)
    _, states = global_batches([loader(shapes_world, rank=r, world_size=2, num_workers=0) for r in range(2)], 1)
    with pytest.raises(ValueError, match="merge_train_states"):  # one rank's part alone cannot be re-split
        loader(shapes_world, rank=0, world_size=1, num_workers=0, state=states[0])


def test_merge_refuses_states_of_different_steps(shapes_world):
    loaders = [loader(shapes_world, rank=r, world_size=2, num_workers=0) for r in range(2)]
    next(iter(loaders[0]))
    with pytest.raises(ValueError, match="different numbers of micro-batches"):
        merge_train_states([l.state_dict() for l in loaders])
