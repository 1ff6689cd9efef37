"""Reading the checkpoint folders that epic.engine.checkpoint writes (no DeepSpeed engine needed).

    run.dir/checkpoints/step_00000100/{vlm,generator}/ rank_*.pt trainer_state.json COMPLETE
    run.dir/checkpoints/latest
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

import torch


STEP_DIR = re.compile(r"^step_(\d+)$")
COMPLETE = "COMPLETE"


class CheckpointError(RuntimeError):
    pass


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = STEP_DIR.match(child.name)
            if match and (child / COMPLETE).is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def find_checkpoint(path: str | os.PathLike) -> Optional[Path]:
    """A run dir, its `checkpoints/` dir or one `step_*` dir -> the newest COMPLETE checkpoint dir (or None)."""
    path = Path(path)
    if (path / COMPLETE).is_file():
        return path
    if STEP_DIR.match(path.name) and path.is_dir():
        raise CheckpointError(f"{path} is an incomplete checkpoint (no {COMPLETE} marker: the save was "
                              f"interrupted). Pick an earlier one under {path.parent}.")
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    # The newest COMPLETE one: `latest` is written after COMPLETE, so a job killed in between leaves `latest` one
    # behind a checkpoint that is whole.
    complete = complete_checkpoints(root)
    return complete[-1][1] if complete else None


def read_trainer_state(ckpt_dir: Path) -> dict:
    with open(Path(ckpt_dir) / "trainer_state.json") as f:
        return json.load(f)


def read_module_state_dict(ckpt_dir: str | os.PathLike, engine_name: str = "vlm") -> dict:
    """The full module state dict of one engine from a ZeRO-1/2 checkpoint (rank 0 wrote the whole module)."""
    path = Path(ckpt_dir) / engine_name / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: is {ckpt_dir} a checkpoint written by epic/pretrain.py "
                              f"(with a '{engine_name}' engine)?")
    state = torch.load(path, map_location="cpu", weights_only=False)
    return state["module"]
