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


@pytest.fixture(scope="module")
def gloo_rank():
    """One DeepSpeed rank in this process (gloo on localhost), torn down after the module.

    Teardown goes through deepspeed.comm so DeepSpeed drops its cached groups too: after a bare
    torch.distributed.destroy_process_group, the next module's engine would broadcast over a dead world group
    ("Group ... is not registered")."""
    import deepspeed
    import deepspeed.comm

    from launch import free_port

    saved_environ = dict(os.environ)  # tools run in this process (init_distributed) export more, e.g. LOCAL_WORLD_SIZE
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-identical runs to compare
    deepspeed.init_distributed(dist_backend="gloo")
    yield
    deepspeed.comm.destroy_process_group()
    torch.set_num_threads(threads)
    os.environ.clear()  # a leaked LOCAL_WORLD_SIZE=1 would break every later 2-rank launch of this session
    os.environ.update(saved_environ)
