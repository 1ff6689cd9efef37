"""PreemptionHandler: a signal becomes a flag; all ranks agree on the step at which to stop."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from launch import free_port

from epic.engine.preemption import PreemptionHandler

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def sentinel_handlers():
    """Install recognisable handlers first, so that close() can be checked to restore them."""
    def sentinel(signum, frame):
        raise AssertionError("the sentinel handler must not run while PreemptionHandler is installed")

    previous = {s: signal.signal(s, sentinel) for s in (signal.SIGUSR1, signal.SIGTERM)}
    yield sentinel
    for s, handler in previous.items():
        signal.signal(s, handler)


def test_no_signal_no_stop(sentinel_handlers):
    with PreemptionHandler() as handler:
        assert not handler.should_stop() and handler.received is None


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_to_self_sets_the_flag(sentinel_handlers, sig):
    handler = PreemptionHandler()
    try:
        os.kill(os.getpid(), sig)  # delivered to the main thread before kill() returns to Python code
        assert handler.requested and handler.should_stop()
        assert handler.received == sig
    finally:
        handler.close()


def test_first_signal_is_recorded(sentinel_handlers):
    with PreemptionHandler() as handler:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert handler.received == signal.SIGUSR1


def test_close_restores_previous_handlers(sentinel_handlers):
    handler = PreemptionHandler()
    assert signal.getsignal(signal.SIGUSR1) == handler._on_signal
    handler.close()
    assert signal.getsignal(signal.SIGUSR1) is sentinel_handlers
    assert signal.getsignal(signal.SIGTERM) is sentinel_handlers
    handler.close()  # idempotent


def test_only_the_chosen_signals_are_caught(sentinel_handlers):
    with PreemptionHandler(signals=(signal.SIGUSR1,)):
        assert signal.getsignal(signal.SIGTERM) is sentinel_handlers


# Rank 1 signals itself after step 3; rank 0 never gets a signal. Both must stop after step 3 and report it.
WORKER = r"""
import json, os, signal, time
import torch.distributed as dist
from epic.dist import init_distributed
from epic.engine.preemption import PreemptionHandler

info = init_distributed()
handler = PreemptionHandler()
stopped_at = None
for step in range(1, 50):
    if info.rank == 1 and step == 3:
        os.kill(os.getpid(), signal.SIGUSR1)
    if info.rank == 0:
        time.sleep(0.02)  # rank 0 runs behind: the agreement must not depend on timing
    if handler.should_stop():
        stopped_at = step
        break
handler.close()
print(json.dumps({"rank": info.rank, "stopped_at": stopped_at,
                  "received": handler.received.name if handler.received else None}), flush=True)
dist.destroy_process_group()
"""


def test_two_gloo_ranks_stop_at_the_same_step():
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                   PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = {}
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        row = json.loads(out.strip().splitlines()[-1])
        results[row["rank"]] = row
    assert results[0] == {"rank": 0, "stopped_at": 3, "received": None}
    assert results[1] == {"rank": 1, "stopped_at": 3, "received": "SIGUSR1"}
