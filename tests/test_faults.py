"""Fault injection on 2 CPU ranks (tools/fault_drill.py, EPIC_FAULT hooks in epic/faults.py): every run is checked
against one uninterrupted reference run on data — the sample keys of every global micro-batch, the loss of every
step (exactly once in metrics.jsonl and in TensorBoard), step numbers and checkpoint contents.

The CI cases are few and short (EPIC-METER tiny, 6 steps, each trial starts from the reference's checkpoint before
its fault); `python tools/fault_drill.py --trials N` draws random steps and moments for the full table."""
from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from launch import free_port

from epic import faults
from epic.engine.logger import truncate_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _drill_module():
    spec = importlib.util.spec_from_file_location("fault_drill", ROOT / "tools" / "fault_drill.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fault_drill"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def drill(shapes_world, tmp_path_factory):
    fd = _drill_module()
    d = fd.Drill(Path(shapes_world), tmp_path_factory.mktemp("fault_drill"), random.Random(0), steps=6)
    d.make_reference()
    return d


def assert_survived(outcome):
    assert outcome.survived, outcome
    assert outcome.lost == 0 and outcome.repeated == 0


def test_kill_in_save_then_dead_rank_then_full_disk_then_damaged_checkpoint(drill):
    """One run dir through four faults in a row, then compared with the reference."""
    run = drill.start_from_reference("chain", 3)  # the reference up to its step-2 checkpoint
    # SIGKILL of the job after trainer_state.json, before COMPLETE of step 4: step 2 stays the newest
    assert drill.kill_inside_save(run, "save_before_complete", 4) is None
    # rank 1 dies after step 3: rank 0 stops (exit 3), saying that rank 1 died
    assert drill.rank_fault(run, "kill", 3) is None
    # the disk fills up while step 6 is saved: exit 1 on both ranks, latest still step 4, no partial files
    assert drill.full_disk(run, 6) is None
    # step 4's rank-1 file is garbled (same size: only rank 1's torch.load finds out): both ranks fall back to
    # step 2 together (never to step 0; rank 0 does not announce step 4) and finish
    assert_survived(drill.damaged_newest_resumes_previous(run, "rank 1 file garbled, same size"))


def test_elastic_resume_two_to_one_to_two_ranks(drill):
    """2 ranks to step 2, 1 rank to step 4 (grad accum 4 instead of 2, universal checkpoint), 2 ranks to step 6:
    the same global sample sequence as the uninterrupted 2-rank run, losses to float tolerance."""
    assert_survived(drill.elastic_trial(2, 4))
    ckpt = drill.workdir.glob("*elastic*/checkpoints/step_00000002/vlm_universal/zero")
    assert list(ckpt), "the 2-rank checkpoint was not converted to a universal one"


def test_nonfinite_vlm_loss_is_skipped_and_counted(drill):
    outcome = drill.nan_engine("vlm", 3, 2)  # steps 3 and 4: the generator's losses stay the reference's
    assert outcome.survived, outcome


def test_nonfinite_generator_losses_in_a_row_stop_the_run_with_a_checkpoint(drill):
    outcome = drill.nan_stop_trial("generator", 3)  # steps 3, 4, 5 -> stop at 5, generator weights of step 2
    assert outcome.survived, outcome


def test_corrupt_samples_are_skipped_and_counted_exactly(drill):
    outcome = drill.corrupt_data(0.10)
    assert outcome.survived, outcome
    counts = dict(item.split("=") for item in outcome.note.split())
    assert len(counts) >= 2 and sum(map(int, counts.values())) >= 3, counts  # not a vacuous comparison


# --------------------------------------------------------------------------------------------- small units
STALL = r"""
import os, sys, time
import torch, torch.distributed as dist
from epic.dist import heartbeat, init_distributed, is_collective_failure, peer_report, start_heartbeat
ready = os.path.join(os.environ["STALL_DIR"], "ready")
open(f"{ready}{os.environ['RANK']}", "w").close()  # both ranks imported: start the clock together (a loaded
while not all(os.path.exists(f"{ready}{r}") for r in range(2)):  # machine imports at different speeds)
    time.sleep(0.05)
info = init_distributed(timeout_minutes=float(sys.argv[1]) / 60)
start_heartbeat()
heartbeat(1)
dist.all_reduce(torch.ones(1))
if info.rank == 1:
    time.sleep(300)  # hangs (a dead NFS mount, a stuck kernel)
heartbeat(2)
start = time.time()
try:
    dist.all_reduce(torch.ones(1))
except Exception as err:
    print(f"{is_collective_failure(err)} {time.time() - start:.1f} {peer_report(info.rank, info.world_size)}", flush=True)
    os._exit(3)
"""
STALL_TIMEOUT_S = 10


def test_stalled_rank_ends_the_others_within_the_gloo_timeout(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), STALL_DIR=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", STALL, str(STALL_TIMEOUT_S)],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT) for r in range(2)]
    try:
        out, err = procs[0].communicate(timeout=240)
    finally:
        procs[1].kill()
    assert procs[0].returncode == 3, err[-2000:]
    failure, waited, report = out.strip().splitlines()[-1].split(" ", 2)
    assert failure == "True" and 0.8 * STALL_TIMEOUT_S <= float(waited) < 6 * STALL_TIMEOUT_S, out
    assert report == "rank 1 (last started step 1) hangs (alive, but not in this collective)", report


def test_fault_spec_parsing():
    assert faults.parse_faults("kill:step:5:1, nan:generator:3:2") == [
        faults.Fault("kill", "step", 5, 1), faults.Fault("nan", "generator", 3, 2)]
    with pytest.raises(ValueError, match="kind:point:step"):
        faults.parse_faults("explode:now")


def test_nan_poison_covers_k_steps(monkeypatch):
    import torch

    monkeypatch.setenv("EPIC_FAULT", "nan:vlm:3:2")
    hit = [bool(torch.isnan(faults.poison("vlm", s, torch.ones(())))) for s in range(1, 7)]
    assert hit == [False, False, True, True, False, False]
    assert not torch.isnan(faults.poison("generator", 3, torch.ones(())))


def test_truncate_jsonl_keeps_steps_up_to_k_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "v": s}) + "\n" for s in range(1, 7)) + '{"step": 7, "v"')
    assert truncate_jsonl(path, 4) == 3
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_a_truncated_shard_reached_after_the_first_batch_is_counted(shapes_world, tmp_path):
    """Regression (found by the drill): a shard reader adds its truncated_tar count when it reaches the cut; the
    stream used to hand out a fresh counter per batch, so a cut reached in a later batch was never counted."""
    import tarfile

    from epic.data import build_train_loader

    good, second = sorted((Path(shapes_world) / "train").glob("*.tar"))[:2]
    data = second.read_bytes()
    with tarfile.open(second) as tar:
        image = [m for m in tar.getmembers() if m.name.endswith(".jpg")][6]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: image.offset_data + image.size // 2])  # 6 whole samples, then a torn image
    loader = build_train_loader({"shards": [str(good), str(cut)], "weight": 1.0}, Path(shapes_world) / "tokenizer", image_size=16,
                                max_text_len=16, batch_size=4, num_workers=0, seed=3, rank=0, world_size=1)
    it = iter(loader)
    for _ in range(8):  # 32 draws from two open shards: the 6-sample one runs out after the first batch
        next(it)
    assert loader.skip_counts()["truncated_tar"] >= 1
