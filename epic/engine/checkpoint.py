"""Checkpoints: DeepSpeed engines + per-rank trainer state, written so that a crash never leaves a bad `latest`.

Layout of `run.dir/checkpoints/`:

    step_00000100/
        vlm/                      DeepSpeed checkpoint of the main VLM (tag "vlm"; zero_to_fp32 works on it)
        generator/                ... of the EPIC generator engine, when there is one
        rank_00000.pt             per-rank state: RNG states, data-stream position (DeepSpeed keeps neither)
        trainer_state.json        step, samples seen, world size, the resolved config
        COMPLETE                  written last, after every rank finished: the size of every file above (JSON)
        vlm_universal/            (made on demand) DeepSpeed universal checkpoint of `vlm`, for an elastic resume
    latest                        the tag of the newest COMPLETE checkpoint (replaced atomically; for people and
                                  tools: resuming takes the newest COMPLETE one, which a kill between COMPLETE and
                                  `latest` leaves one ahead)

Every rank must call `save_checkpoint` (DeepSpeed's save is collective). A save that fails on any rank (a full
disk, say) fails on every rank with one CheckpointError, and its partial folder is removed. Loading checks the
files against COMPLETE's list first, so a truncated or missing file is found before any engine is touched;
`load_newest` then falls back to the next older checkpoint, and never to a fresh start.

Elastic resume: a checkpoint written by N ranks loads on M ranks. Engines with ZeRO-partitioned optimizer state
are converted once with DeepSpeed's `ds_to_universal` (into `<engine>_universal/`, by rank 0) and loaded with
`load_universal`; the per-rank state of every saved rank is returned so that the data positions can be re-split.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from epic import faults
# reading checkpoints needs no engine: these live in a leaf (epic.ckpt_files) that models/ can use too
from epic.ckpt_files import (COMPLETE, STEP_DIR, CheckpointError, complete_checkpoints, find_checkpoint,  # noqa: F401
                             read_module_state_dict, read_trainer_state, tag_for_step)

UNIVERSAL_SUFFIX = "_universal"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_ranks_ok(ok: bool) -> bool:
    """True on every rank iff `ok` on every rank (collective when torch.distributed is initialised)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ok
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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
    """Collective: every rank calls it. Returns the checkpoint directory; raises CheckpointError on every rank when
    any rank failed (after removing the partial directory)."""
    root = Path(ckpt_root)
    tag_dir = root / tag_for_step(step)
    rank = _rank()
    faults.at("save_begin", step)
    error = _attempt(lambda: _prepare_dir(tag_dir) if rank == 0 else None)
    if all_ranks_ok(error is None):
        error = _attempt(lambda: _write_rank_parts(tag_dir, step, engines, rank_state, rank))
    if all_ranks_ok(error is None) and rank == 0:
        error = _attempt(lambda: _commit(root, tag_dir, step, trainer_state, keep_last))
    if not all_ranks_ok(error is None):
        if rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)  # the partial files; `latest` still names the previous one
        _barrier()
        raise CheckpointError(_save_failure_message(error, tag_dir, root))
    return tag_dir


def _attempt(fn) -> Optional[BaseException]:
    try:
        fn()
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError (iostream error)
        return err
    return None


def _prepare_dir(tag_dir: Path) -> None:
    tag_dir.mkdir(parents=True, exist_ok=True)
    stale = tag_dir / COMPLETE  # re-saving the same step (e.g. after a resume): invalidate first
    if stale.exists():
        stale.unlink()


def _write_rank_parts(tag_dir: Path, step: int, engines: dict, rank_state: dict, rank: int) -> None:
    _barrier()  # rank 0 made the directory
    full = faults.FullDisk() if faults.disk_full("save_engines", step) else contextlib.nullcontext()
    with full:
        for i, (name, engine) in enumerate(engines.items()):
            if i == 1:
                faults.at("save_between", step)
            engine.save_checkpoint(str(tag_dir), tag=name, client_state={"step": step}, save_latest=False)
        if len(engines) == 1:
            faults.at("save_between", step)
        _atomic_torch_save(rank_state, tag_dir / f"rank_{rank:05d}.pt")


def _commit(root: Path, tag_dir: Path, step: int, trainer_state: dict, keep_last: int) -> None:
    """Rank 0, once every rank wrote its part: trainer state, COMPLETE (the file list), then `latest`."""
    _atomic_write_text(tag_dir / "trainer_state.json", json.dumps(trainer_state, indent=1, default=str))
    faults.at("save_before_complete", step)
    _atomic_write_text(tag_dir / COMPLETE, json.dumps({"files": file_sizes(tag_dir)}, indent=0) + "\n")
    faults.at("save_before_latest", step)
    _atomic_write_text(root / "latest", tag_dir.name + "\n")
    prune_checkpoints(root, keep_last)


def file_sizes(tag_dir: Path) -> dict[str, int]:
    """Relative path -> size of every file of a checkpoint (without COMPLETE and the universal conversions)."""
    sizes = {}
    for path in sorted(tag_dir.rglob("*")):
        rel = path.relative_to(tag_dir).as_posix()
        if path.is_file() and rel != COMPLETE and not rel.split("/")[0].endswith(UNIVERSAL_SUFFIX):
            sizes[rel] = path.stat().st_size
    return sizes


def is_disk_full(error: Optional[BaseException], folder: Path) -> bool:
    """ENOSPC / EDQUOT anywhere in the exception chain, or a write error while (almost) no space is left."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "no space left" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(_existing_parent(folder)).free < 64 * 2**20
    except OSError:
        return False


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _save_failure_message(error: Optional[BaseException], tag_dir: Path, root: Path) -> str:
    latest = root / "latest"
    previous = latest.read_text().strip() if latest.is_file() else None
    keep = (f"`latest` still names {previous}, which a relaunch resumes from" if previous
            else "there is no earlier checkpoint")
    if error is None:
        return f"another rank failed to write its part of checkpoint {tag_dir}; removed the partial files; {keep}"
    if is_disk_full(error, tag_dir):
        try:
            free = f"{shutil.disk_usage(_existing_parent(root)).free / 2**30:.2f} GiB free now"
        except OSError:
            free = "free space unknown"
        return (f"no space left on device while writing checkpoint {tag_dir.name} to {root} ({free}); removed the "
                f"partial files; {keep}. Free space there (or set run.dir elsewhere / lower train.keep_last) and "
                f"relaunch.")
    return (f"could not write checkpoint {tag_dir} ({type(error).__name__}: {error}); removed the partial files; "
            f"{keep}")


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
def verify_checkpoint(ckpt_dir: Path) -> Optional[str]:
    """Why a complete checkpoint cannot load (a missing / truncated file, unreadable trainer state), or None.

    Cheap (sizes and one small JSON), so every rank checks before any engine is touched. Checkpoints written before
    COMPLETE held the file list are only checked for their trainer state and rank files."""
    ckpt_dir = Path(ckpt_dir)
    try:
        state = read_trainer_state(ckpt_dir)
        if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not isinstance(
                state.get("world_size"), int):
            return "trainer_state.json has no integer step / world_size"
    except (OSError, ValueError) as err:
        return f"trainer_state.json is unreadable ({type(err).__name__}: {err})"
    try:
        listed = json.loads((ckpt_dir / COMPLETE).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        listed = None  # an older checkpoint ("ok")
    expected = listed or {f"rank_{r:05d}.pt": None for r in range(state["world_size"])}
    for rel, size in expected.items():
        path = ckpt_dir / rel
        if not path.is_file():
            return f"{rel} is missing"
        if size is not None and path.stat().st_size != size:
            return f"{rel} has {path.stat().st_size} bytes, {size} were written"
    return None


def resume_candidates(path: str | os.PathLike) -> list[Path]:
    """Complete checkpoints to try, from the newest to the oldest (a step dir: only that one)."""
    path = Path(path)
    if (path / COMPLETE).is_file():
        return [path]
    first = find_checkpoint(path)
    if first is None:
        return []
    return [p for _, p in reversed(complete_checkpoints(first.parent))]


def load_newest(candidates: list[Path], engines: dict, world_size: int, log=print) -> tuple[Path, dict, list]:
    """Load the first candidate that loads on every rank -> (its dir, trainer_state, rank states).

    A candidate that fails (on any rank) is reported with the reason and the next one is tried; when none loads
    this raises CheckpointError instead of starting from scratch. Collective."""
    failures = []
    for i, candidate in enumerate(candidates):
        reason = verify_checkpoint(candidate)
        if all_ranks_ok(reason is None):  # agree before loading: the universal conversion is collective
            try:
                result = load_checkpoint(candidate, engines, world_size)
            except Exception as err:  # torch.load / DeepSpeed raise many types on a damaged file
                reason = f"{type(err).__name__}: {err}"
            if all_ranks_ok(reason is None):
                return (candidate,) + result
        reason = reason or "it failed on another rank"
        failures.append(f"{candidate.name}: {reason}")
        following = candidates[i + 1].name if i + 1 < len(candidates) else None
        log(f"checkpoint {candidate} does not load ({reason}); " +
            (f"falling back to {following}" if following else "no older checkpoint left"))
    raise CheckpointError(
        f"none of the {len(candidates)} complete checkpoints loads ({'; '.join(failures)}). Refusing to start from "
        f"scratch over them: repair or move them away, or start a new run.dir (--resume none).")


def load_checkpoint(ckpt_dir: Path, engines: dict, world_size: int) -> tuple[dict, list[dict]]:
    """Restore every engine (module, optimizer, scheduler) -> (trainer_state, per-rank states).

    Same world size: [this rank's state]. Another world size (elastic): the states of every saved rank, in rank
    order (the caller re-splits the data positions); ZeRO-partitioned engines go through a universal checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    trainer_state = read_trainer_state(ckpt_dir)
    saved_world = int(trainer_state.get("world_size"))
    elastic = saved_world != world_size
    for name, engine in engines.items():
        if not (ckpt_dir / name).is_dir():
            raise CheckpointError(f"{ckpt_dir} has no '{name}' engine state (found: "
                                  f"{sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir())}). Was it written by "
                                  f"a run with a different objective (vanilla vs EPIC)?")
        if elastic and zero_partition_files(ckpt_dir / name):
            load_path = _load_universal(engine, ensure_universal(ckpt_dir, name), name)
        else:
            load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=name, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load '{name}' from {ckpt_dir}")
    ranks = range(saved_world) if elastic else [_rank()]
    rank_states = []
    for r in ranks:
        rank_file = ckpt_dir / f"rank_{r:05d}.pt"
        if not rank_file.is_file():
            raise CheckpointError(f"missing per-rank state {rank_file}")
        rank_states.append(torch.load(rank_file, map_location="cpu", weights_only=False))
    return trainer_state, rank_states


def zero_partition_files(engine_dir: Path) -> list[Path]:
    return sorted(Path(engine_dir).glob("*zero_pp_rank_*_optim_states.pt"))


def ensure_universal(ckpt_dir: Path, name: str) -> Path:
    """`<ckpt>/<name>_universal`: DeepSpeed's universal form of one engine's checkpoint (made once, by rank 0).

    Our engines do not record `universal_checkpoint_info` (only Megatron-style models do), so the conversion
    injects the default one (`--inject_missing_state`); for plain data parallelism that is all it needs."""
    out = Path(ckpt_dir) / f"{name}{UNIVERSAL_SUFFIX}"
    error = None
    if _rank() == 0 and not (out / "zero").is_dir():
        error = _attempt(lambda: _convert_to_universal(Path(ckpt_dir) / name, out))
    if not all_ranks_ok(error is None):
        raise CheckpointError(f"converting {Path(ckpt_dir) / name} to a DeepSpeed universal checkpoint failed"
                              + (f": {type(error).__name__}: {error}" if error else " (on rank 0)"))
    return out


def _convert_to_universal(engine_dir: Path, out: Path) -> None:
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(engine_dir), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ds_to_universal.main(args)
    except (AssertionError, ValueError, KeyError) as err:  # its checks are asserts
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"ds_to_universal: {err}") from err
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def _load_universal(engine, universal_dir: Path, name: str):
    """engine.load_checkpoint on a universal checkpoint. DeepSpeed reads `checkpoint.load_universal` only inside
    load_checkpoint, and which checkpoint loads (and whether its world size differs) is known only now, so the
    flag is switched on for this one call instead of in the JSON."""
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        load_path, _ = engine.load_checkpoint(str(universal_dir.parent), tag=universal_dir.name,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
    finally:
        config.load_universal_checkpoint = before
    return load_path


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
