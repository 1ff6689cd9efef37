"""The real sbatch scripts on a real (local, single-node) Slurm cluster started by tools/local_slurm.sh.

`slurm/meter_16m.sh` (4 nodes x 8 A100 in its header) is submitted unchanged, resized on the sbatch command line to
1 node x 2 CPU tasks and switched to its CPU smoke configuration with EPIC_SMOKE_CPU=1. Checked: 2 ranks train
and checkpoint; a SIGUSR1 sent mid-run (as Slurm does before a time limit or a preemption) makes every rank save,
the job requeue itself, and the requeued run resume from the checkpoint and finish.

Without a Slurm cluster these tests skip, except under CI=true, where they fail: CI must run
`tools/local_slurm.sh start` first (it installs slurm-wlm and munge with apt-get when missing).
"""
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCAL_SLURM = ROOT / "tools" / "local_slurm.sh"
STAND_IN = "tests/slurm_fake_trainer.py"
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
    """EPIC_RUNS, the job-log folder, and a shapes-world stand-in folder for EPIC_DATA."""
    runs, logs, data = tmp_path / "runs", tmp_path / "logs", tmp_path / "data"
    for folder in (runs, logs, data / "train"):
        folder.mkdir(parents=True)
    return runs, logs, data


def smoke_env(env: dict, runs: Path, data: Path, trainer: str, overrides: str = "") -> dict:
    return {**env, "EPIC_SMOKE_CPU": "1", "EPIC_RUNS": str(runs), "EPIC_DATA": str(data),
            "EPIC_PYTHON": os.environ.get("EPIC_PYTHON", __import__("sys").executable), "EPIC_TRAINER": trainer,
            "EPIC_SMOKE_OVERRIDES": overrides, "FAKE_STEP_SECONDS": "0.25"}


# --------------------------------------------------------------------------------------------------------------
# The launcher with the stand-in trainer: the requeue machinery on its own, in seconds
# --------------------------------------------------------------------------------------------------------------
def read_events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def test_stand_in_trains_on_two_ranks(slurm_env, job_dirs):
    runs, logs, data = job_dirs
    env = smoke_env(slurm_env, runs, data, STAND_IN, "epic.masking=uniform")
    # sbatch passes on the submitting shell's environment: a stale launcher's RANK/WORLD_SIZE must not win.
    env.update(RANK="5", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_PORT="1")
    job = sbatch(env, "slurm/meter_16m.sh", RESIZE + [f"--output={logs}/%x-%j.out"],
                 ["train.max_steps=6", "train.save_every=3"])
    fields = wait_for_job(env, job, timeout=120)
    log = job_log(logs, job)
    assert fields.get("JobState") == "COMPLETED" and fields.get("ExitCode") == "0:0", log
    run_dir = runs / "epic_meter_16m_smoke"
    events = read_events(run_dir)
    assert [e["event"] for e in events] == ["check", "start", "done"], log
    assert all(e["world_size"] == 2 and e["launcher"] == "slurm" for e in events)
    assert {(run_dir / f"rank_{r}_step.txt").read_text() for r in (0, 1)} == {"6"}  # both ranks saved
    assert "rank 1/2 step 6" in log and "--config epic_shapes_tiny" in log and "cpu_zero2.json" in log


def test_stand_in_usr1_saves_requeues_and_resumes(slurm_env, job_dirs):
    runs, logs, data = job_dirs
    env = smoke_env(slurm_env, runs, data, STAND_IN, "epic.masking=uniform")
    job = sbatch(env, "slurm/meter_16m.sh", RESIZE + [f"--output={logs}/%x-%j.out"],
                 ["train.max_steps=24", "train.save_every=1000"])
    wait_for_job(env, job, timeout=120, until=lambda: "rank 0/2 step 4\n" in job_log(logs, job))
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
    fields = wait_for_job(env, job, timeout=150)
    log = job_log(logs, job)
    assert fields.get("JobState") == "COMPLETED" and fields.get("Restarts") == "1", log
    events = [(e["event"], e["restart"]) for e in read_events(runs / "epic_meter_16m_smoke")]
    assert events == [("check", 0), ("start", 0), ("preempted", 0), ("check", 1), ("start", 1), ("done", 1)], log
    saved = [e for e in read_events(runs / "epic_meter_16m_smoke") if e["event"] == "preempted"][0]
    resumed = [e for e in read_events(runs / "epic_meter_16m_smoke") if e["event"] == "start"][1]
    assert saved["signal"] == "SIGUSR1" and 4 <= saved["step"] < 24 and resumed["step"] == saved["step"]
    assert f"preempted: checkpoint saved at step {saved['step']}" in log
    assert f"requeueing job {job} (restart 1)" in log


def test_missing_environment_and_bad_config_fail_before_training(slurm_env, job_dirs):
    runs, logs, data = job_dirs
    env = smoke_env(slurm_env, runs, data, STAND_IN, "epic.masking=uniform")
    no_runs = {k: v for k, v in env.items() if k != "EPIC_RUNS"}
    options = RESIZE + [f"--output={logs}/%x-%j.out"]
    job_env = sbatch(no_runs, "slurm/meter_16m.sh", options)
    job_cfg = sbatch(env, "slurm/meter_16m.sh", options, ["train.max_step=5"])  # misspelt key
    for job in (job_env, job_cfg):
        fields = wait_for_job(env, job, timeout=120)
        assert fields.get("JobState") == "FAILED" and fields.get("Restarts") == "0", job_log(logs, job)
    assert "EPIC_RUNS is not set: export EPIC_RUNS=" in job_log(logs, job_env)
    log = job_log(logs, job_cfg)
    assert "train.max_step" in log and "pre-flight check failed" in log
    assert not (runs / "epic_meter_16m_smoke" / "fake_checkpoint.json").exists()
