"""Checkpoints: DeepSpeed engines + per-rank trainer state, written so that a crash never leaves a bad `latest`.

Layout of `run.dir/checkpoints/`:

    step_00000100/
        vlm/                      DeepSpeed checkpoint of the main VLM (tag "vlm"; zero_to_fp32 works on it)
        generator/                ... of the EPIC generator engine, when there is one
        rank_00000.pt             per-rank state: RNG states, data-stream position (DeepSpeed keeps neither)
        trainer_state.json        step, samples seen, world size, the resolved config
        COMPLETE                  written last, after every rank finished
    latest                        the tag of the newest COMPLETE checkpoint (replaced atomically)

Every rank must call `save_checkpoint` (DeepSpeed's save is collective).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

# reading checkpoints needs no engine: these live in a leaf (epic.ckpt_files) that models/ can use too
from epic.ckpt_files import (COMPLETE, STEP_DIR, CheckpointError, complete_checkpoints, find_checkpoint,  # noqa: F401
                             read_module_state_dict, read_trainer_state, tag_for_step)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# RNG state (DeepSpeed checkpoints hold none)
# ---------------------------------------------------------------------------------------------------------------
def capture_rng_state(extra_generators: Optional[dict[str, torch.Generator]] = None) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    state["generators"] = {k: g.get_state() for k, g in (extra_generators or {}).items()}
    return state


def restore_rng_state(state: dict, extra_generators: Optional[dict[str, torch.Generator]] = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    for name, gen in (extra_generators or {}).items():
        if name in state.get("generators", {}):
            gen.set_state(state["generators"][name])


# ---------------------------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------------------------
def save_checkpoint(ckpt_root: str | os.PathLike, step: int, engines: dict, rank_state: dict, trainer_state: dict,
                    keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    root = Path(ckpt_root)
    tag_dir = root / tag_for_step(step)
    rank = _rank()
    if rank == 0:
        tag_dir.mkdir(parents=True, exist_ok=True)
        stale = tag_dir / COMPLETE  # re-saving the same step (e.g. after a resume): invalidate first
        if stale.exists():
            stale.unlink()
    _barrier()
    for name, engine in engines.items():
        engine.save_checkpoint(str(tag_dir), tag=name, client_state={"step": step}, save_latest=False)
    _atomic_torch_save(rank_state, tag_dir / f"rank_{rank:05d}.pt")
    _barrier()
    if rank == 0:
        _atomic_write_text(tag_dir / "trainer_state.json", json.dumps(trainer_state, indent=1, default=str))
        _atomic_write_text(tag_dir / COMPLETE, "ok\n")
        _atomic_write_text(root / "latest", tag_dir.name + "\n")
        prune_checkpoints(root, keep_last)
    _barrier()
    return tag_dir


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; drop older ones and incomplete leftovers below them."""
    complete = complete_checkpoints(root)
    if not complete:
        return
    keep = {path for _, path in complete[-keep_last:]}
    newest_step = complete[-1][0]
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if not match or child in keep:
            continue
        if (child / COMPLETE).is_file() or int(match.group(1)) < newest_step:
            shutil.rmtree(child, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# Find and load
# ---------------------------------------------------------------------------------------------------------------
def load_checkpoint(ckpt_dir: Path, engines: dict, world_size: int) -> tuple[dict, dict]:
    """Restore every engine (module, optimizer, scheduler) and return (trainer_state, this rank's state)."""
    ckpt_dir = Path(ckpt_dir)
    trainer_state = read_trainer_state(ckpt_dir)
    saved_world = trainer_state.get("world_size")
    if saved_world != world_size:
        raise CheckpointError(
            f"{ckpt_dir} was written by {saved_world} ranks, this run has {world_size}. The ZeRO-2 optimizer "
            f"partitions and the per-rank data streams depend on the world size. Either resume with {saved_world} "
            f"ranks, or convert with DeepSpeed's ds_to_universal.py and start a new run (weights only: "
            f"--init-from for fine-tuning, or zero_to_fp32).")
    for name, engine in engines.items():
        if not (ckpt_dir / name).is_dir():
            raise CheckpointError(f"{ckpt_dir} has no '{name}' engine state (found: "
                                  f"{sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir())}). Was it written by "
                                  f"a run with a different objective (vanilla vs EPIC)?")
        load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=name, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load '{name}' from {ckpt_dir}")
    rank_file = ckpt_dir / f"rank_{_rank():05d}.pt"
    if not rank_file.is_file():
        raise CheckpointError(f"missing per-rank state {rank_file}")
    rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
    return trainer_state, rank_state


# ---------------------------------------------------------------------------------------------------------------
# Weights only (evaluation, teacher, fine-tuning): world-size independent under ZeRO-2
# ---------------------------------------------------------------------------------------------------------------


def load_model_from_checkpoint(path: str | os.PathLike, engine_name: str = "vlm"):
    """A run dir / checkpoint dir -> (model in eval mode, the run's resolved Config, checkpoint dir).

    Kept for old callers; it is ``epic.models.loading.load_model`` (the one weight loader)."""
    from epic.models.loading import load_model

    loaded = load_model(path, engine=engine_name)
    if loaded.source.kind != "deepspeed":
        raise CheckpointError(f"{path} is not a run dir or checkpoint dir of epic/pretrain.py")
    return loaded.model.eval(), loaded.run_config(), loaded.source.path
