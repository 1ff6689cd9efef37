"""Process-group set-up for every way a run is started: deepspeed / torchrun launchers, Slurm `srun`, or one process.

    info = init_distributed()          # once, at the start of the trainer, before deepspeed.initialize
    info.rank, info.world_size, info.local_rank, info.launcher

DeepSpeed only reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (under `srun` it would otherwise
fall into MPI discovery), so `init_distributed` works them out from whichever launcher started us, exports them,
and then calls `deepspeed.init_distributed`. The parsing is pure functions of an env dict, unit-tested per launcher.

Launchers, in the order they are recognised:
  torchrun   RANK + WORLD_SIZE + TORCHELASTIC_RUN_ID (also LOCAL_WORLD_SIZE)
  deepspeed  RANK + WORLD_SIZE + LOCAL_SIZE / CROSS_RANK (deepspeed.launcher.launch)
  env        RANK + WORLD_SIZE from anything else (a hand-written launcher, or a re-exec of one of the above)
  slurm      a task of an `srun` step: SLURM_PROCID + SLURM_STEP_ID. A plain `python …` in an sbatch script (the
             batch step has SLURM_PROCID=0 but no step id) is a single process, never rank 0 of SLURM_NTASKS.
  single     none of the above: world size 1
"""
from __future__ import annotations

import atexit
import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

LAUNCHERS = ("torchrun", "deepspeed", "env", "slurm", "single")
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 20000  # MASTER_PORT = 20000 + job id mod 20000 (below the ephemeral range)


class DistEnvError(RuntimeError):
    """The launcher's environment is inconsistent or incomplete (the message names the variable and the fix)."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ---------------------------------------------------------------------------------------------------------------
# Slurm string formats
# ---------------------------------------------------------------------------------------------------------------
def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets: 'a[1,3],b' -> ['a[1,3]', 'b']."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_range_list(spec: str, nodelist: str) -> list[str]:
    """'01-03,7' -> ['01', '02', '03', '7'] (zero padding kept from the lower bound)."""
    out = []
    for item in spec.split(","):
        if re.fullmatch(r"\d+", item):
            out.append(item)
        elif re.fullmatch(r"\d+-\d+", item):
            low, high = item.split("-")
            if int(high) < int(low):
                raise DistEnvError(f"nodelist '{nodelist}': descending range '{item}'")
            out.extend(str(n).zfill(len(low)) for n in range(int(low), int(high) + 1))
        else:
            raise DistEnvError(f"nodelist '{nodelist}': cannot parse range '{item}' (expected like 01-04,7)")
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list -> host names: 'node[01-02],gpu7' -> ['node01', 'node02', 'gpu7'].

    A pure-python fallback for `scontrol show hostnames`; handles any number of bracket groups per name.
    """
    if not nodelist or nodelist.count("[") != nodelist.count("]"):
        raise DistEnvError(f"cannot parse Slurm nodelist '{nodelist}'")
    hosts: list[str] = []
    for part in _split_top_level(nodelist.strip()):
        match = re.search(r"\[([^\[\]]*)\]", part)
        if match is None:
            hosts.append(part)
            continue
        head, tail = part[:match.start()], part[match.end():]
        for value in _expand_range_list(match.group(1), nodelist):
            hosts.extend(expand_nodelist(head + value + tail))
    return hosts


def parse_tasks_per_node(text: str) -> list[int]:
    """SLURM_TASKS_PER_NODE / SLURM_STEP_TASKS_PER_NODE -> per-node task counts: '8(x3),4' -> [8, 8, 8, 4]."""
    counts = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if match is None:
            raise DistEnvError(f"cannot parse Slurm tasks-per-node '{text}' (expected like 8(x4) or 2,1)")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def first_host(nodelist: str, run: Optional[Callable[[list[str]], str]] = None) -> str:
    """The first host of a Slurm nodelist: `scontrol show hostnames` when it is available, else our parser."""
    if run is None and shutil.which("scontrol"):
        def run(cmd: list[str]) -> str:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    if run is not None:
        try:
            hosts = run(["scontrol", "show", "hostnames", nodelist]).split()
            if hosts:
                return hosts[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return expand_nodelist(nodelist)[0]


def slurm_master_port(job_id: str) -> int:
    """A port every task of one job derives alike, different between jobs sharing a node."""
    if not job_id.isdigit():
        raise DistEnvError(f"SLURM_JOB_ID='{job_id}' is not a number; set MASTER_PORT explicitly")
    return SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN


# ---------------------------------------------------------------------------------------------------------------
# Env -> DistInfo (pure)
# ---------------------------------------------------------------------------------------------------------------
def _int_var(env: Mapping[str, str], name: str) -> int:
    value = env.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistEnvError(f"{name}='{value}' is not an integer; check how the job was launched") from None


def detect_launcher(env: Mapping[str, str]) -> str:
    if "RANK" in env or "WORLD_SIZE" in env:
        if not ("RANK" in env and "WORLD_SIZE" in env):
            missing = "WORLD_SIZE" if "RANK" in env else "RANK"
            raise DistEnvError(f"{missing} is not set but {'RANK' if missing == 'WORLD_SIZE' else 'WORLD_SIZE'} is: "
                               f"set both (or neither, for one process)")
        if "TORCHELASTIC_RUN_ID" in env:
            return "torchrun"
        if "LOCAL_SIZE" in env or "CROSS_RANK" in env:
            return "deepspeed"
        return "env"
    if "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        return "slurm"
    return "single"


def _check_ranks(info: DistInfo) -> DistInfo:
    if info.world_size < 1:
        raise DistEnvError(f"world size {info.world_size} < 1 (launcher: {info.launcher})")
    if not 0 <= info.rank < info.world_size:
        raise DistEnvError(f"rank {info.rank} is outside [0, world size {info.world_size}) "
                           f"(launcher: {info.launcher}); the launcher's RANK / WORLD_SIZE (or SLURM_PROCID / "
                           f"SLURM_NTASKS) disagree")
    if not 0 <= info.local_rank < info.local_world_size:
        raise DistEnvError(f"local rank {info.local_rank} is outside [0, local world size {info.local_world_size}) "
                           f"(launcher: {info.launcher})")
    if info.local_world_size > info.world_size:
        raise DistEnvError(f"local world size {info.local_world_size} > world size {info.world_size} "
                           f"(launcher: {info.launcher})")
    if not 0 < info.master_port < 65536:
        raise DistEnvError(f"MASTER_PORT={info.master_port} is not a valid port")
    return info


def _from_rank_env(env: Mapping[str, str], launcher: str) -> DistInfo:
    world = _int_var(env, "WORLD_SIZE")
    rank = _int_var(env, "RANK")
    local_rank = _int_var(env, "LOCAL_RANK") if "LOCAL_RANK" in env else (rank if world == 1 else None)
    if local_rank is None:
        raise DistEnvError(f"RANK/WORLD_SIZE are set ({launcher} launcher) but LOCAL_RANK is not: set LOCAL_RANK "
                           f"(the process's index on its node)")
    local_world = None
    # each launcher's own variable first: DeepSpeed's sets LOCAL_SIZE, torchrun LOCAL_WORLD_SIZE (a stale one
    # inherited from a parent process must not override what this launcher says)
    names = ("LOCAL_SIZE", "LOCAL_WORLD_SIZE") if launcher == "deepspeed" else ("LOCAL_WORLD_SIZE", "LOCAL_SIZE")
    for name in names:
        if name in env:
            local_world = _int_var(env, name)
            break
    if local_world is None:  # not told: assume one node (only used to share out CPU threads)
        local_world = world
    if world > 1 and "MASTER_ADDR" not in env:
        raise DistEnvError(f"WORLD_SIZE={world} but MASTER_ADDR is not set: export MASTER_ADDR (host of rank 0) "
                           f"and MASTER_PORT")
    port = _int_var(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500
    return _check_ranks(DistInfo(rank, local_rank, world, local_world, env.get("MASTER_ADDR", "127.0.0.1"),
                                 port, launcher))


def _from_slurm_env(env: Mapping[str, str], hostnames: Optional[Callable[[list[str]], str]]) -> DistInfo:
    rank = _int_var(env, "SLURM_PROCID")
    world_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    if world_var not in env:
        raise DistEnvError("SLURM_PROCID is set but neither SLURM_STEP_NUM_TASKS nor SLURM_NTASKS is: run the "
                           "trainer with `srun` inside an sbatch/salloc allocation")
    world = _int_var(env, world_var)
    local_rank = _int_var(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
    node_id = _int_var(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
    per_node = None
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if name in env:
            counts = parse_tasks_per_node(env[name])
            if node_id >= len(counts):
                raise DistEnvError(f"SLURM_NODEID={node_id} but {name}='{env[name]}' lists {len(counts)} nodes")
            per_node = counts[node_id]
            break
    if per_node is None and "SLURM_NTASKS_PER_NODE" in env:
        per_node = _int_var(env, "SLURM_NTASKS_PER_NODE")
    if per_node is None:
        per_node = world
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if "MASTER_ADDR" in env:
        addr = env["MASTER_ADDR"]
    elif nodelist:
        addr = first_host(nodelist, hostnames)
    elif world == 1:
        addr = "127.0.0.1"
    else:
        raise DistEnvError("SLURM_JOB_NODELIST is not set: cannot find the master host; export MASTER_ADDR")
    if "MASTER_PORT" in env:
        port = _int_var(env, "MASTER_PORT")
    elif "SLURM_JOB_ID" in env:
        port = slurm_master_port(env["SLURM_JOB_ID"])
    else:
        raise DistEnvError("neither MASTER_PORT nor SLURM_JOB_ID is set: export MASTER_PORT")
    return _check_ranks(DistInfo(rank, local_rank, world, per_node, addr, port, "slurm"))


def dist_info_from_env(env: Mapping[str, str],
                       hostnames: Optional[Callable[[list[str]], str]] = None) -> DistInfo:
    """Who am I? From a launcher's environment (pure apart from `scontrol show hostnames` under Slurm).

    `hostnames` runs a command and returns its stdout (injected in tests); None runs the real `scontrol` when it
    is installed and falls back to the pure-python nodelist parser otherwise.
    """
    launcher = detect_launcher(env)
    if launcher in ("torchrun", "deepspeed", "env"):
        return _from_rank_env(env, launcher)
    if launcher == "slurm":
        return _from_slurm_env(env, hostnames)
    port = _int_var(env, "MASTER_PORT") if "MASTER_PORT" in env else 0  # 0: pick a free port at init
    return DistInfo(0, 0, 1, 1, env.get("MASTER_ADDR", "127.0.0.1"), port, "single")


def torch_env_vars(info: DistInfo) -> dict[str, str]:
    """The variables torch.distributed's env:// rendezvous and DeepSpeed read."""
    return {"RANK": str(info.rank), "WORLD_SIZE": str(info.world_size), "LOCAL_RANK": str(info.local_rank),
            "LOCAL_WORLD_SIZE": str(info.local_world_size), "MASTER_ADDR": info.master_addr,
            "MASTER_PORT": str(info.master_port)}


def cpu_threads_per_rank(local_world_size: int, env: Mapping[str, str], cpus: Optional[int] = None) -> Optional[int]:
    """CPU threads for one rank: the node's CPUs shared out, or None when OMP_NUM_THREADS decides."""
    if env.get("OMP_NUM_THREADS"):
        return None
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(1, local_world_size))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------------
# Side effects
# ---------------------------------------------------------------------------------------------------------------
_INITIALISED: Optional[DistInfo] = None


def destroy_distributed() -> None:
    """Tear the process group down (registered with atexit by `init_distributed`).

    A gloo group left to the interpreter's shutdown can abort the process ("terminate called without an active
    exception") after the run has finished; destroying it explicitly joins its threads first.
    """
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def init_distributed(backend: Optional[str] = None, timeout_minutes: Optional[float] = None) -> DistInfo:
    """Detect the launcher, export the torch variables, pin the device / CPU threads, start the process group.

    Always initialises torch.distributed (world size 1 for a single process, so the trainer's DeepSpeed engines
    and collectives work unchanged). backend: None = "nccl" with CUDA, else "gloo". Idempotent: a second call
    returns the first call's answer.
    """
    global _INITIALISED
    import torch

    if _INITIALISED is not None and torch.distributed.is_initialized():
        return _INITIALISED

    info = dist_info_from_env(os.environ)
    if info.master_port == 0:
        info = DistInfo(**{**info.__dict__, "master_port": _free_port()})
    os.environ.update(torch_env_vars(info))
    if torch.cuda.is_available():
        if info.local_rank >= torch.cuda.device_count():
            raise DistEnvError(f"local rank {info.local_rank} but only {torch.cuda.device_count()} visible GPUs "
                               f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start "
                               f"one task per GPU (e.g. #SBATCH --ntasks-per-node equal to --gpus-per-node)")
        torch.cuda.set_device(info.local_rank)
    else:
        threads = cpu_threads_per_rank(info.local_world_size, os.environ)
        if threads is not None:
            torch.set_num_threads(threads)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":  # a timed-out NCCL collective aborts the process instead of hanging it (torch's default)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    if not torch.distributed.is_initialized():
        import deepspeed
        from datetime import timedelta

        kwargs = {}
        if timeout_minutes is not None:
            kwargs["timeout"] = timedelta(minutes=timeout_minutes)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   rank=info.rank, world_size=info.world_size, **kwargs)
        atexit.register(destroy_distributed)
    _INITIALISED = info
    return info


# ---------------------------------------------------------------------------------------------------------------
# Dead or stalled ranks: a timeout on every collective, a heartbeat per step, and a report naming the rank
# ---------------------------------------------------------------------------------------------------------------
TIMEOUT_ENV = "EPIC_COLLECTIVE_TIMEOUT_S"
_HEARTBEAT = "epic/heartbeat/{}"


def collective_timeout_s(configured: float, env: Mapping[str, str] = os.environ) -> float:
    """run.collective_timeout_s, or EPIC_COLLECTIVE_TIMEOUT_S when set (the env wins: set per job by a launcher)."""
    value = env.get(TIMEOUT_ENV)
    if value is None:
        return float(configured)
    try:
        seconds = float(value)
    except ValueError:
        raise DistEnvError(f"{TIMEOUT_ENV}='{value}' is not a number of seconds") from None
    if not seconds > 0:
        raise DistEnvError(f"{TIMEOUT_ENV}={value} must be > 0 seconds")
    return seconds


_ALIVE = "epic/alive/{}"
_FAILED = "epic/failed/{}"
_ALIVE_EVERY_S = 1.0
_heartbeat_store = None


def _own_store(timeout_s: float = 10.0):
    """A client connection of our own to the rendezvous store (MASTER_ADDR:MASTER_PORT, hosted by rank 0), so that
    the heartbeat thread never shares a socket with the main thread."""
    import torch.distributed as tdist
    from datetime import timedelta

    return tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


def start_heartbeat() -> None:
    """A daemon thread that bumps this rank's alive counter every second, whatever the main thread is doing (a dead
    process stops bumping it; a hung one does not), plus the step it starts (`heartbeat`). Stopped (and joined) at
    exit, before the process group is destroyed: a store client left in a thread at shutdown aborts the process."""
    import threading

    global _heartbeat_store
    import torch.distributed as tdist

    if _heartbeat_store is not None or not (tdist.is_available() and tdist.is_initialized()):
        return
    if tdist.get_world_size() == 1 or "MASTER_ADDR" not in os.environ:
        return
    try:
        _heartbeat_store = _own_store()
        thread_store = _own_store()
    except (RuntimeError, OSError, ValueError):
        _heartbeat_store = None
        return
    rank = tdist.get_rank()
    stop = threading.Event()

    def beat():
        while not stop.is_set():
            try:
                thread_store.add(_ALIVE.format(rank), 1)
            except (RuntimeError, OSError):
                return  # the store host is gone
            stop.wait(_ALIVE_EVERY_S)

    thread = threading.Thread(target=beat, name="epic-heartbeat", daemon=True)
    thread.start()

    def stop_heartbeat():
        global _heartbeat_store
        stop.set()
        thread.join(timeout=5)
        _heartbeat_store = None

    atexit.register(stop_heartbeat)  # atexit runs last-in first-out: before destroy_distributed


def heartbeat(step: int) -> None:
    """This rank starts optimizer step `step` (one small write to the rendezvous store; read only after a failure)."""
    if _heartbeat_store is not None:
        import torch.distributed as tdist

        try:
            _heartbeat_store.set(_HEARTBEAT.format(tdist.get_rank()), str(step))
        except (RuntimeError, OSError):
            pass  # the store host is gone: the next collective fails and says so


def is_collective_failure(error: BaseException) -> bool:
    import torch.distributed as tdist

    kinds = tuple(getattr(tdist, name) for name in ("DistError", "DistBackendError", "DistNetworkError")
                  if hasattr(tdist, name))
    text = str(error).lower()
    return isinstance(error, kinds) or any(word in text for word in (
        "gloo", "nccl", "timed out", "connection closed", "connection reset", "broken pipe", "socket timeout"))


def peer_report(rank: int, world_size: int, wait_s: float = 4.0) -> str:
    """After a failed collective: which ranks died (alive counter stopped) or hang (alive, but not failing like
    us), from the rendezvous store. Takes `wait_s` seconds (to watch the counters move)."""
    if _heartbeat_store is None:
        return "no heartbeat (start_heartbeat was not called)"
    others = [r for r in range(world_size) if r != rank]
    try:
        store = _own_store(timeout_s=wait_s + 5)
        store.set(_FAILED.format(rank), "1")

        def counters():
            return {r: store.add(_ALIVE.format(r), 0) for r in others}

        before = counters()
        time.sleep(wait_s)
        after = counters()
        failed = {r for r in others if store.check([_FAILED.format(r)])}
        steps = {r: int(store.get(_HEARTBEAT.format(r))) if store.check([_HEARTBEAT.format(r)]) else 0
                 for r in range(world_size)}
    except (RuntimeError, OSError, ValueError):
        host = "this rank" if rank == 0 else "rank 0"
        return (f"the rendezvous store on {host} is unreachable: rank 0 has most likely died (or its node lost "
                f"the network)")
    dead = [r for r in others if after[r] == before[r]]
    hung = [r for r in others if r not in dead and r not in failed]

    def named(ranks, what):
        where = ", ".join(f"{r} (last started step {steps[r]})" for r in ranks)
        return f"rank{'s' if len(ranks) > 1 else ''} {where} {what}"

    parts = ([named(dead, "died (its heartbeat stopped)")] if dead else []) + (
        [named(hung, "hangs (alive, but not in this collective)")] if hung else [])
    if not parts:
        return f"every rank is alive and failing alike (steps {steps}): a network problem?"
    return "; ".join(parts)
