"""Data: the shapes world, webdataset shards, transforms, text (tokenizer, content mask, MLM) and the loaders."""
from .loader import build_eval_loader, build_train_loader, EvalLoader, TrainLoader
from .shards import SKIP_REASONS, expand_shard_spec, parse_sources
from .synthetic import generate_shapes_world, shard_spec
from .text import content_token_mask, load_tokenizer

__all__ = [
    "build_train_loader", "build_eval_loader", "TrainLoader", "EvalLoader", "SKIP_REASONS", "expand_shard_spec",
    "parse_sources", "generate_shapes_world", "shard_spec", "content_token_mask", "load_tokenizer",
]
