"""Shared fixtures. `shapes_world`: a small generated shapes world, made once per test session."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU tensors through the interpreter

SHAPES_WORLD = dict(n_train=256, n_val=64, image_size=64, seed=0, samples_per_shard=64)


@pytest.fixture(scope="session")
def shapes_world(tmp_path_factory):
    """Path of a shapes world (train: 4 shards x 64 images, val: 1 shard x 64, 64 px, tokenizer, manifest.json)."""
    from epic.data.synthetic import generate_shapes_world

    return generate_shapes_world(tmp_path_factory.mktemp("shapes_world"), **SHAPES_WORLD)
