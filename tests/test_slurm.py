"""The real sbatch scripts on a real (local, single-node) Slurm cluster started by tools/local_slurm.sh.

`slurm/meter_16m.sh` (4 nodes x 8 A100 in its header) is submitted unchanged, resized on the sbatch command line to
1 node x 2 CPU tasks and switched to its CPU smoke configuration with EPIC_SMOKE_CPU=1. Checked: 2 ranks train
and checkpoint; a SIGUSR1 sent mid-run (as Slurm does before a time limit or a preemption) makes every rank save,
the job requeue itself, and the requeued run resume from the checkpoint and finish. A real time limit
(`--time=2 --signal=B:USR1@75`) does the same through Slurm's own timer. `slurm/finetune_vqa.sh` (the
fine-tuning wrappers share the launcher) fine-tunes a 2-rank pretraining run on 2 ranks in its smoke mode.

Without a Slurm cluster these tests skip, except under CI=true, where they fail: CI must run
`tools/local_slurm.sh start` first (it installs slurm-wlm and munge with apt-get when missing).
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCAL_SLURM = ROOT / "tools" / "local_slurm.sh"
# 1 node x 2 CPU tasks instead of the header's 4 x 8 GPUs; a time limit far from the header's USR1@600 grace.
RESIZE = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=30"]


# --------------------------------------------------------------------------------------------------------------
# The cluster
# --------------------------------------------------------------------------------------------------------------
def _unavailable(reason: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"Slurm is required in CI but unavailable: {reason}. .ci/run must call "
                    f"`bash tools/local_slurm.sh start` before the tests.", pytrace=False)
    pytest.skip(f"no local Slurm cluster: {reason} (start one with `bash tools/local_slurm.sh start`)")


@pytest.fixture(scope="module")
def slurm_env():
    """The environment for sbatch/squeue/scontrol against the local cluster (started here if it is not up)."""
    if os.geteuid() != 0:
        _unavailable("tools/local_slurm.sh needs root")
    was_up = subprocess.run(["bash", str(LOCAL_SLURM), "status"], capture_output=True, text=True).returncode == 0
    # Tests never apt-get: an installed Slurm is started, a missing one is a skip (or a CI failure).
    proc = subprocess.run(["bash", str(LOCAL_SLURM), "start"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "EPIC_SLURM_NO_INSTALL": "1"})
    match = re.search(r"export SLURM_CONF=(\S+)", proc.stdout)
    if proc.returncode != 0 or match is None:
        _unavailable(f"`tools/local_slurm.sh start` failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "EPIC_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                         "MASTER_ADDR", "MASTER_PORT")}
    env["SLURM_CONF"] = match.group(1)
    yield env
    if not was_up:
        subprocess.run(["bash", str(LOCAL_SLURM), "stop"], capture_output=True, timeout=60)


def sbatch(env: dict, script: str, options: list[str], args: list[str] = ()) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *options, script, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def job_fields(env: dict, job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for_job(env: dict, job_id: str, timeout: float, until=None) -> dict:
    """Poll until the job has left the queue (or `until()` is true); fail with the log on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if until is not None and until():
            return job_fields(env, job_id)
        queued = subprocess.run(["squeue", "-h", "-j", job_id], env=env, capture_output=True, text=True).stdout
        if until is None and not queued.strip():
            return job_fields(env, job_id)
        time.sleep(0.3)
    subprocess.run(["scancel", job_id], env=env)
    pytest.fail(f"job {job_id} did not {'reach the condition' if until else 'finish'} within {timeout} s; "
                f"fields: {job_fields(env, job_id)}")


def job_log(log_dir: Path, job_id: str) -> str:
    logs = list(log_dir.glob(f"*-{job_id}.out"))
    return logs[0].read_text() if logs else ""


@pytest.fixture
def job_dirs(tmp_path):
    """EPIC_RUNS and the job-log folder."""
    runs, logs = tmp_path / "runs", tmp_path / "logs"
    runs.mkdir()
    logs.mkdir()
    return runs, logs


# EPIC with uniform masking: the EPIC script's whole path (generator engine included) without a teacher run.
SMOKE_OVERRIDES = ("epic.masking=uniform data.micro_batch_size=8 train.global_batch_size=16 data.num_workers=1 "
                   "train.log_every=1 train.keep_last=5")


def smoke_env(env: dict, runs: Path, data: Path, overrides: str = SMOKE_OVERRIDES) -> dict:
    return {**env, "EPIC_SMOKE_CPU": "1", "EPIC_RUNS": str(runs), "EPIC_DATA": str(data),
            "EPIC_PYTHON": os.environ.get("EPIC_PYTHON", sys.executable), "EPIC_SMOKE_OVERRIDES": overrides,
            "OMP_NUM_THREADS": "1"}


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def complete_checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*/COMPLETE"))


# --------------------------------------------------------------------------------------------------------------
# slurm/meter_16m.sh with the real trainer
# --------------------------------------------------------------------------------------------------------------
def test_meter_16m_trains_and_checkpoints_on_two_ranks(slurm_env, job_dirs, shapes_world):
    runs, logs = job_dirs
    env = smoke_env(slurm_env, runs, shapes_world)
    # sbatch passes on the submitting shell's environment: a stale launcher's RANK/WORLD_SIZE must not win.
    env.update(RANK="5", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_PORT="1")
    job = sbatch(env, "slurm/meter_16m.sh", RESIZE + [f"--output={logs}/%x-%j.out"],
                 ["train.max_steps=4", "train.save_every=2"])
    fields = wait_for_job(env, job, timeout=240)
    log = job_log(logs, job)
    assert fields.get("JobState") == "COMPLETED" and fields.get("ExitCode") == "0:0", log
    assert "--config epic_shapes_tiny" in log and "cpu_zero2.json" in log
    assert '"check": "ok", "world_size": 2' in log  # the pre-flight ran on the job's 2 ranks
    assert "training: world 2, micro batch 8, grad accum 1, global batch 16" in log
    run_dir = runs / "epic_meter_16m_smoke"
    assert logged_steps(run_dir) == [1, 2, 3, 4]
    assert complete_checkpoints(run_dir) == [2, 4]
    last = run_dir / "checkpoints" / "step_00000004"
    assert (last / "rank_00000.pt").is_file() and (last / "rank_00001.pt").is_file()
    assert json.loads((last / "trainer_state.json").read_text())["world_size"] == 2


def test_meter_16m_usr1_checkpoints_requeues_and_resumes(slurm_env, job_dirs, shapes_world):
    runs, logs = job_dirs
    env = smoke_env(slurm_env, runs, shapes_world)
    env["EPIC_PREFLIGHT"] = "0"  # the test above covers the pre-flight; this one saves its two launches
    max_steps = 12
    job = sbatch(env, "slurm/meter_16m.sh", RESIZE + [f"--output={logs}/%x-%j.out"],
                 [f"train.max_steps={max_steps}", "train.save_every=1000"])
    wait_for_job(env, job, timeout=240, until=lambda: f"step 2/{max_steps} " in job_log(logs, job))
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
    fields = wait_for_job(env, job, timeout=300)
    log = job_log(logs, job)
    assert fields.get("JobState") == "COMPLETED" and fields.get("Restarts") == "1", log
    match = re.search(r"preempted: checkpoint saved at step (\d+)", log)
    assert match, log
    saved = int(match.group(1))
    assert 2 <= saved < max_steps
    assert f"requeueing job {job} (restart 1)" in log
    assert f"from step {saved} to {max_steps}" in log  # the requeued job resumed from the preemption checkpoint
    run_dir = runs / "epic_meter_16m_smoke"
    assert logged_steps(run_dir) == list(range(1, max_steps + 1))  # nothing trained twice, nothing skipped
    assert complete_checkpoints(run_dir) == [saved, max_steps]


def test_time_limit_notice_checkpoints_requeues_and_resumes(slurm_env, job_dirs, shapes_world):
    """A real time limit: `--time=2 --signal=B:USR1@75` makes Slurm itself send USR1 about 45 s in (its timer may
    fire up to a minute early or a few seconds late); the job saves, requeues, and its next start resumes."""
    runs, logs = job_dirs
    env = {**smoke_env(slurm_env, runs, shapes_world), "EPIC_PREFLIGHT": "0"}
    max_steps = 100_000  # never reached: the job is cancelled once it has resumed
    options = [o for o in RESIZE if not o.startswith("--time")] + ["--time=2", "--signal=B:USR1@75",
                                                                   f"--output={logs}/%x-%j.out"]
    job = sbatch(env, "slurm/meter_16m.sh", options, [f"train.max_steps={max_steps}", "train.save_every=100000"])
    resumed = re.compile(rf"from step [1-9]\d* to {max_steps}")
    wait_for_job(env, job, timeout=300, until=lambda: resumed.search(job_log(logs, job)) is not None)
    subprocess.run(["scancel", job], env=env, check=True)
    wait_for_job(env, job, timeout=120)
    log = job_log(logs, job)
    assert "SIGUSR1 (preemption or time limit) during train" in log, log
    saved = int(re.search(r"preempted: checkpoint saved at step (\d+)", log).group(1))
    assert f"requeueing job {job} (restart 1)" in log
    assert f"from step {saved} to {max_steps}" in log
    assert saved in complete_checkpoints(runs / "epic_meter_16m_smoke")


def test_missing_environment_and_bad_config_fail_before_training(slurm_env, job_dirs, shapes_world):
    runs, logs = job_dirs
    env = smoke_env(slurm_env, runs, shapes_world)
    no_runs = {k: v for k, v in env.items() if k != "EPIC_RUNS"}
    options = RESIZE + [f"--output={logs}/%x-%j.out"]
    job_env = sbatch(no_runs, "slurm/meter_16m.sh", options)
    job_cfg = sbatch(env, "slurm/meter_16m.sh", options, ["train.max_step=5"])  # misspelt key
    for job in (job_env, job_cfg):
        fields = wait_for_job(env, job, timeout=120)
        assert fields.get("JobState") == "FAILED" and fields.get("Restarts") == "0", job_log(logs, job)
    assert "EPIC_RUNS is not set: export EPIC_RUNS=" in job_log(logs, job_env)
    log = job_log(logs, job_cfg)
    assert "unknown config key 'train.max_step'" in log and "pre-flight check failed" in log
    assert not (runs / "epic_meter_16m_smoke" / "checkpoints").exists()


# --------------------------------------------------------------------------------------------------------------
# slurm/finetune_<task>.sh: the same launcher with epic/finetune.py
# --------------------------------------------------------------------------------------------------------------
def test_finetune_vqa_wrapper_fine_tunes_on_two_ranks(slurm_env, job_dirs, shapes_world, tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_export import two_rank_pretraining_run

    from epic.data.tasks import generate_shapes_tasks

    pretrained = two_rank_pretraining_run(shapes_world, tmp_path_factory.getbasetemp())
    data = tmp_path_factory.mktemp("slurm_tasks")
    generate_shapes_tasks(data, n_train=32, n_val=8, image_size=64)
    runs, logs = job_dirs
    env = smoke_env(slurm_env, runs, data, overrides="data.micro_batch_size=4 train.global_batch_size=8 "
                                                     "train.log_every=1")
    env["EPIC_INIT"] = str(pretrained)
    job = sbatch(env, "slurm/finetune_vqa.sh", RESIZE + [f"--output={logs}/%x-%j.out"], ["train.max_steps=2"])
    fields = wait_for_job(env, job, timeout=300)
    log = job_log(logs, job)
    assert fields.get("JobState") == "COMPLETED" and fields.get("ExitCode") == "0:0", log
    assert "--task vqa" in log and f"--init {pretrained}" in log and "--config finetune_shapes" in log
    assert "training: world 2, micro batch 4, grad accum 1, global batch 8" in log
    summary = json.loads(next(line for line in reversed(log.splitlines()) if line.startswith('{"task": "vqa"')))
    assert summary["final_step"] == 2 and 0.0 <= summary["val"]["vqa_score"] <= 100.0
    run_dir = runs / "finetune_vqa_smoke"
    assert complete_checkpoints(run_dir) == [2]
    assert json.loads((run_dir / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())[
        "world_size"] == 2
