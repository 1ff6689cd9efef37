"""Launcher detection and env parsing (epic/dist.py) for deepspeed, torchrun, srun and single processes."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from epic.dist import (DistEnvError, DistInfo, cpu_threads_per_rank, detect_launcher, dist_info_from_env,
                       expand_nodelist, first_host, parse_tasks_per_node, slurm_master_port, torch_env_vars)

ROOT = Path(__file__).resolve().parents[1]

# The variables a task of `srun` saw on the local Slurm cluster (tools/local_slurm.sh), 4 nodes x 8 tasks.
SRUN_TASK_17 = {
    "SLURM_JOB_ID": "4242", "SLURM_JOBID": "4242", "SLURM_PROCID": "17", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
    "SLURM_NTASKS": "32", "SLURM_NPROCS": "32", "SLURM_NTASKS_PER_NODE": "8", "SLURM_TASKS_PER_NODE": "8(x4)",
    "SLURM_STEP_ID": "0", "SLURM_STEPID": "0", "SLURM_STEP_NUM_TASKS": "32", "SLURM_STEP_NUM_NODES": "4",
    "SLURM_STEP_TASKS_PER_NODE": "8(x4)", "SLURM_STEP_NODELIST": "gpu[007-010]", "SLURM_JOB_NODELIST": "gpu[007-010]",
    "SLURM_NODELIST": "gpu[007-010]", "SLURM_CPUS_PER_TASK": "8",
}
# ... and what the batch shell of the same job sees: no step id. A `python ...` there is one process.
SBATCH_SHELL = {k: v for k, v in SRUN_TASK_17.items() if "STEP" not in k}
SBATCH_SHELL.update(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0")


def no_scontrol(cmd):
    raise FileNotFoundError("scontrol")


# --------------------------------------------------------------------------------------------------------------
# Slurm string formats
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nodelist, hosts", [
    ("node[01-04],gpu7", ["node01", "node02", "node03", "node04", "gpu7"]),
    ("vm", ["vm"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("a[1,3-4],b[2]", ["a1", "a3", "a4", "b2"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("x-1,y-2", ["x-1", "y-2"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[01-04", "node[a-b]", "node[4-1]", ""])
def test_expand_nodelist_rejects_malformed(bad):
    with pytest.raises(DistEnvError, match="nodelist"):
        expand_nodelist(bad)


def test_expand_nodelist_agrees_with_scontrol():
    conf = os.environ.get("SLURM_CONF") or "/tmp/epic-slurm/slurm.conf"
    if not (shutil.which("scontrol") and os.path.isfile(conf)):
        pytest.skip("no scontrol with a config here (tools/local_slurm.sh start provides one)")
    for nodelist in ["node[01-04],gpu7", "n[098-101]", "rack[1-2]-n[01-02]", "a[1,3-4],b[2]"]:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             env={**os.environ, "SLURM_CONF": conf}, check=True).stdout.split()
        assert expand_nodelist(nodelist) == out, nodelist


@pytest.mark.parametrize("text, counts", [("8(x4)", [8, 8, 8, 8]), ("2", [2]), ("8(x2),4", [8, 8, 4]),
                                          ("3,1,2(x2)", [3, 1, 2, 2])])
def test_parse_tasks_per_node(text, counts):
    assert parse_tasks_per_node(text) == counts


def test_parse_tasks_per_node_rejects_garbage():
    with pytest.raises(DistEnvError, match="tasks-per-node"):
        parse_tasks_per_node("8x4")


def test_first_host_prefers_scontrol_and_falls_back_to_parser():
    calls = []

    def fake_scontrol(cmd):
        calls.append(cmd)
        return "hostA\nhostB\n"

    assert first_host("gpu[1-2]", fake_scontrol) == "hostA"
    assert calls == [["scontrol", "show", "hostnames", "gpu[1-2]"]]
    assert first_host("gpu[1-2]", no_scontrol) == "gpu1"


def test_slurm_master_port_is_per_job_and_valid():
    assert slurm_master_port("4242") == 20000 + 4242
    assert slurm_master_port("123456") != slurm_master_port("123457")
    assert all(1024 < slurm_master_port(str(j)) < 65536 for j in (0, 19999, 20000, 10**9))
    with pytest.raises(DistEnvError, match="MASTER_PORT"):
        slurm_master_port("12_3")


# --------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------
def test_srun_task():
    info = dist_info_from_env(SRUN_TASK_17, hostnames=no_scontrol)
    assert info == DistInfo(rank=17, local_rank=1, world_size=32, local_world_size=8, master_addr="gpu007",
                            master_port=20000 + 4242, launcher="slurm")


def test_srun_uneven_tasks_per_node_uses_this_nodes_count():
    env = dict(SRUN_TASK_17, SLURM_STEP_TASKS_PER_NODE="8(x3),4", SLURM_STEP_NUM_TASKS="28", SLURM_NODEID="3",
               SLURM_PROCID="26", SLURM_LOCALID="2")
    info = dist_info_from_env(env, hostnames=no_scontrol)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (26, 28, 2, 4)


def test_srun_env_master_overrides_nodelist():
    env = dict(SRUN_TASK_17, MASTER_ADDR="10.0.0.1", MASTER_PORT="12345")
    info = dist_info_from_env(env, hostnames=no_scontrol)
    assert (info.master_addr, info.master_port) == ("10.0.0.1", 12345)


def test_batch_shell_without_srun_is_a_single_process():
    assert detect_launcher(SBATCH_SHELL) == "single"
    info = dist_info_from_env(SBATCH_SHELL)
    assert (info.rank, info.world_size, info.launcher) == (0, 1, "single")


def test_torchrun():
    env = {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "h0",
           "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "none", "GROUP_RANK": "1"}
    assert dist_info_from_env(env) == DistInfo(5, 1, 16, 4, "h0", 29400, "torchrun")


def test_deepspeed_launcher():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "LOCAL_SIZE": "8", "CROSS_RANK": "0",
           "CROSS_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert dist_info_from_env(env) == DistInfo(3, 3, 8, 8, "127.0.0.1", 29500, "deepspeed")


def test_rank_env_wins_over_slurm():
    """torchrun / deepspeed started inside an allocation: their RANK is the truth, not SLURM_PROCID."""
    env = dict(SRUN_TASK_17, RANK="2", WORLD_SIZE="4", LOCAL_RANK="2", MASTER_ADDR="h", MASTER_PORT="1234",
               TORCHELASTIC_RUN_ID="x", LOCAL_WORLD_SIZE="4")
    info = dist_info_from_env(env)
    assert (info.launcher, info.rank, info.world_size) == ("torchrun", 2, 4)


def test_single_process():
    info = dist_info_from_env({})
    assert (info.rank, info.local_rank, info.world_size, info.local_world_size, info.launcher) == (0, 0, 1, 1, "single")
    assert info.master_port == 0  # init_distributed picks a free port


@pytest.mark.parametrize("env, message", [
    ({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "h"}, "rank 4 is outside"),
    ({"RANK": "0"}, "WORLD_SIZE is not set"),
    ({"WORLD_SIZE": "2"}, "RANK is not set"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "MASTER_ADDR is not set"),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "LOCAL_RANK is not"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h"},
     "local rank 2 is outside"),
    ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_PORT": "70000"}, "not a valid port"),
    (dict(SRUN_TASK_17, SLURM_PROCID="32"), "rank 32 is outside"),
    (dict(SRUN_TASK_17, SLURM_NODEID="4"), "SLURM_NODEID=4"),
])
def test_inconsistent_env_is_a_clear_error(env, message):
    with pytest.raises(DistEnvError, match=message):
        dist_info_from_env(env, hostnames=no_scontrol)


def test_torch_env_vars_round_trip():
    info = dist_info_from_env(SRUN_TASK_17, hostnames=no_scontrol)
    again = dist_info_from_env({**torch_env_vars(info), "LOCAL_SIZE": "8"})
    assert (again.rank, again.local_rank, again.world_size, again.local_world_size, again.master_addr,
            again.master_port) == (17, 1, 32, 8, "gpu007", 24242)


def test_cpu_threads_per_rank():
    assert cpu_threads_per_rank(2, {}, cpus=16) == 8
    assert cpu_threads_per_rank(4, {}, cpus=2) == 1
    assert cpu_threads_per_rank(2, {"OMP_NUM_THREADS": "3"}, cpus=16) is None


def test_init_distributed_single_process_exports_env_and_starts_gloo():
    code = (
        "import os, torch, torch.distributed as dist\n"
        "from epic.dist import init_distributed\n"
        "info = init_distributed()\n"
        "assert dist.is_initialized() and dist.get_world_size() == 1 and dist.get_backend() == 'gloo'\n"
        "assert os.environ['RANK'] == '0' and os.environ['WORLD_SIZE'] == '1' and os.environ['LOCAL_RANK'] == '0'\n"
        "assert int(os.environ['MASTER_PORT']) == info.master_port > 0\n"
        "assert torch.get_num_threads() == max(1, len(os.sched_getaffinity(0)))\n"
        "t = torch.ones(2); dist.all_reduce(t); assert t.tolist() == [1.0, 1.0]\n"
        "assert init_distributed() == info\n"  # idempotent
        "print('ok', info.launcher)\n")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                       "MASTER_PORT", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok single" in proc.stdout
