#!/bin/bash
# The shared Slurm launcher: every sbatch script in slurm/ is an #SBATCH header plus
#     EPIC_RUN_CONFIG=<config name> exec bash "$EPIC_REPO/slurm/launch.sh" "$@"
# It runs one task per GPU (`srun python epic/pretrain.py ...`) in a stable run directory, so that a requeued or
# resubmitted job resumes from the newest checkpoint, and turns SIGUSR1 (preemption notice or time limit, from
# `#SBATCH --signal=B:USR1@<grace>`) into "every rank finishes its step, saves, exits 0; the job requeues itself".
#
# Environment (exported in the shell that runs sbatch; sbatch passes it on):
#   EPIC_RUNS        required. Run directories live in $EPIC_RUNS/<run name>.
#   EPIC_DATA        required. Shard root (the configs read ${EPIC_DATA}/{coco,vg,sbu,cc3m,cc12m,coco_val}/*.tar);
#                    in smoke mode, a shapes-world folder (tools/make_synthetic_shards.py).
#   EPIC_PRETRAINED  required for real runs: folder with roberta-base/ and clip-vit-b16.pt.
#   EPIC_TEACHER     required for EPIC runs: the vanilla METER teacher (run dir, checkpoint or official .ckpt).
#   EPIC_RUN_NAME    run name and directory name [the config name; smoke runs add _smoke].
#   EPIC_DS_CONFIG   DeepSpeed JSON [ds_configs/zero2_bf16.json; smoke: ds_configs/cpu_zero2.json].
#   EPIC_PYTHON      Python of the environment with epic installed [python on PATH].
#   EPIC_REPO        repository root [the directory sbatch was run from].
#   EPIC_PREFLIGHT   0 skips the `--check-only` pass (config, DS JSON, world size, shards, teacher) [1].
#   EPIC_MAX_REQUEUES  stop requeueing after this many restarts [50].
#   EPIC_MASTER_PORT rendezvous port [20000 + job id mod 20000].
#   EPIC_SMOKE_CPU   1: the same script as a CPU smoke test: tiny shapes-world config (shapes_tiny or
#                    epic_shapes_tiny; {xvlm,albef}_shapes_tiny / epic_{xvlm,albef}_shapes_tiny for those scripts), ds_configs/cpu_zero2.json, gloo, no GPUs; EPIC_SMOKE_OVERRIDES adds
#                    key=value overrides. Resize the job on the sbatch command line, e.g.
#                    sbatch --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 --gpus-per-node=0 slurm/meter_16m.sh
#   EPIC_TRAINER     the training script [epic/pretrain.py; epic/finetune.py when EPIC_FINETUNE_TASK is set].
#   EPIC_FINETUNE_TASK  set by the slurm/finetune_<task>.sh wrappers: retrieval | vqa | nlvr2 | snli_ve.
#   EPIC_INIT        required for fine-tuning: the pretrained run dir, checkpoint, export dir or official .ckpt.
#                    Task data are overrides (finetune.train_json=... finetune.val_json=... finetune.images=...);
#                    in smoke mode EPIC_DATA is a shapes world made with `make_synthetic_shards.py --tasks`.
# Arguments after the script name are config overrides (key=value) passed to the trainer.

# --- 1. Preemption: install the handler first (a USR1 that arrives before `trap` would kill the batch shell). ---
PREEMPTED=0
TERMINATED=0
PHASE=setup
STEP_PID=""
log() { echo "[launch $(date +%H:%M:%S)] $*"; }
die() { echo "[launch] ERROR: $*" >&2; exit 1; }
on_usr1() {
  PREEMPTED=1
  log "SIGUSR1 (preemption or time limit) during $PHASE"
  # Forward to srun, which forwards it to every task; the trainer saves at the end of the current step.
  if [ "$PHASE" = train ] && [ -n "$STEP_PID" ]; then kill -USR1 "$STEP_PID" 2>/dev/null || true; fi
}
on_term() {
  TERMINATED=1
  log "SIGTERM (scancel or hard time limit): asking the ranks to save and stop; no requeue"
  if [ -n "$STEP_PID" ]; then kill -TERM "$STEP_PID" 2>/dev/null || true; fi
}
trap on_usr1 USR1
trap on_term TERM
set -uo pipefail

run_step() {  # run_step <phase> <command...>: run an srun step in the background and wait through signals
  PHASE="$1"; shift
  "$@" &
  STEP_PID=$!
  local rc
  while true; do
    wait "$STEP_PID"; rc=$?
    kill -0 "$STEP_PID" 2>/dev/null || break  # still running: `wait` was interrupted by a trapped signal
  done
  STEP_PID=""
  return "$rc"
}

requeue_or_exit() {  # after a USR1: put the job back in the queue; the next start resumes from the checkpoint
  local restarts="${SLURM_RESTART_COUNT:-0}" max="${EPIC_MAX_REQUEUES:-50}"
  if [ "$restarts" -ge "$max" ]; then
    die "job was already restarted $restarts times (EPIC_MAX_REQUEUES=$max): not requeueing. Resubmit to continue."
  fi
  log "requeueing job $SLURM_JOB_ID (restart $((restarts + 1))); it resumes from $RUN_DIR"
  scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue $SLURM_JOB_ID failed (is --requeue allowed here?); resubmit by hand: the run resumes from $RUN_DIR"
  exit 0
}

# --- 2. Where everything is. ---
[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a Slurm job: submit with sbatch (e.g. sbatch slurm/meter_16m.sh)"
REPO="${EPIC_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
[ -f "$REPO/epic/pretrain.py" ] || die "EPIC_REPO=$REPO is not the repository root (no epic/pretrain.py): submit from the repo root or export EPIC_REPO"
cd "$REPO" || die "cannot cd to $REPO"
PYTHON="${EPIC_PYTHON:-python}"
command -v "$PYTHON" >/dev/null || die "EPIC_PYTHON=$PYTHON not found: activate the environment before sbatch or export EPIC_PYTHON=/path/to/venv/bin/python"
FINETUNE_TASK="${EPIC_FINETUNE_TASK:-}"
if [ -n "$FINETUNE_TASK" ]; then TRAINER="${EPIC_TRAINER:-epic/finetune.py}"; else TRAINER="${EPIC_TRAINER:-epic/pretrain.py}"; fi
[ -f "$TRAINER" ] || die "trainer script $TRAINER not found"
CONFIG="${EPIC_RUN_CONFIG:?EPIC_RUN_CONFIG is not set: call launch.sh from a wrapper such as slurm/meter_16m.sh}"
[ -f "epic/configs/$CONFIG.yaml" ] || die "no config epic/configs/$CONFIG.yaml"
EPIC_RUN=0; case "$CONFIG" in epic_*) EPIC_RUN=1 ;; esac

need_dir() {  # need_dir <VAR> <what it is>
  local name="$1" value="${!1:-}"
  [ -n "$value" ] || die "$name is not set: export $name=<$2> before sbatch"
  [ -e "$value" ] || die "$name=$value does not exist ($2)"
}
need_dir EPIC_RUNS "directory for run directories"
TRAINER_ARGS=()
if [ -n "$FINETUNE_TASK" ]; then
  need_dir EPIC_INIT "pretrained weights: run dir, step_* checkpoint, export dir or official METER .ckpt"
  TRAINER_ARGS=(--task "$FINETUNE_TASK" --init "$EPIC_INIT")
  EPIC_PREFLIGHT=0  # epic/finetune.py validates its config and data at start-up
fi
if [ -n "$FINETUNE_TASK" ] && [ "${EPIC_SMOKE_CPU:-0}" = 1 ]; then
  need_dir EPIC_DATA "a shapes world with tasks/ (tools/make_synthetic_shards.py --tasks)"
  [ -d "$EPIC_DATA/tasks" ] || die "EPIC_DATA=$EPIC_DATA has no tasks/ folder: python tools/make_synthetic_shards.py --out $EPIC_DATA --train 256 --val 64 --tasks"
  CONFIG=finetune_shapes
  RUN_NAME="${EPIC_RUN_NAME:-${EPIC_RUN_CONFIG}_smoke}"
  DS_CONFIG="${EPIC_DS_CONFIG:-ds_configs/cpu_zero2.json}"
  read -r -a SMOKE_OVERRIDES <<< "${EPIC_SMOKE_OVERRIDES:-}"
  EXTRA=("finetune.shapes=$EPIC_DATA" "${SMOKE_OVERRIDES[@]}")
  export CUDA_VISIBLE_DEVICES=""
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
elif [ -n "$FINETUNE_TASK" ]; then
  RUN_NAME="${EPIC_RUN_NAME:-$EPIC_RUN_CONFIG}"
  DS_CONFIG="${EPIC_DS_CONFIG:-ds_configs/zero2_bf16.json}"
  EXTRA=()
elif [ "${EPIC_SMOKE_CPU:-0}" = 1 ]; then
  need_dir EPIC_DATA "a shapes-world folder from tools/make_synthetic_shards.py"
  [ -d "$EPIC_DATA/train" ] || die "EPIC_DATA=$EPIC_DATA has no train/ folder: generate it with python tools/make_synthetic_shards.py --out $EPIC_DATA"
  SMOKE_FAMILY=""; case "$CONFIG" in *xvlm_*) SMOKE_FAMILY=xvlm_ ;; *albef_*) SMOKE_FAMILY=albef_ ;; *vilt_*) SMOKE_FAMILY=vilt_ ;; esac  # the family's tiny config
  if [ "$EPIC_RUN" = 1 ]; then CONFIG=epic_${SMOKE_FAMILY}shapes_tiny; else CONFIG=${SMOKE_FAMILY}shapes_tiny; fi
  RUN_NAME="${EPIC_RUN_NAME:-${EPIC_RUN_CONFIG}_smoke}"
  DS_CONFIG="${EPIC_DS_CONFIG:-ds_configs/cpu_zero2.json}"
  read -r -a SMOKE_OVERRIDES <<< "${EPIC_SMOKE_OVERRIDES:-}"
  EXTRA=("data.root=$EPIC_DATA" ${EPIC_TEACHER:+"epic.teacher=$EPIC_TEACHER"} "${SMOKE_OVERRIDES[@]}")
  export CUDA_VISIBLE_DEVICES=""  # CPU ranks, gloo
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
  need_dir EPIC_DATA "shard root with coco/ vg/ sbu/ cc3m/ (cc12m/) coco_val/"
  [ -n "$(find -L "$EPIC_DATA" -maxdepth 3 -name '*.tar' -print -quit 2>/dev/null)" ] \
    || die "no *.tar shards under EPIC_DATA=$EPIC_DATA (tools/make_shards.py writes them)"
  need_dir EPIC_PRETRAINED "folder with roberta-base/ and clip-vit-b16.pt"
  [ "$EPIC_RUN" = 1 ] && need_dir EPIC_TEACHER "vanilla METER teacher: run dir, checkpoint dir or official .ckpt"
  RUN_NAME="${EPIC_RUN_NAME:-$EPIC_RUN_CONFIG}"
  DS_CONFIG="${EPIC_DS_CONFIG:-ds_configs/zero2_bf16.json}"
  EXTRA=()
fi
[ -f "$DS_CONFIG" ] || die "DeepSpeed config $DS_CONFIG not found (see ds_configs/)"
RUN_DIR="$EPIC_RUNS/$RUN_NAME"
mkdir -p "$RUN_DIR" || die "cannot create $RUN_DIR"

# --- 3. Process group: rank 0's host and a per-job port (epic/dist.py reads these, and SLURM_PROCID etc.). ---
# sbatch copies the submitting shell's environment: drop another launcher's rank variables, which would win.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE LOCAL_SIZE CROSS_RANK CROSS_SIZE TORCHELASTIC_RUN_ID
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1)"
export MASTER_ADDR="${MASTER_ADDR:-$(hostname)}"
export MASTER_PORT="${EPIC_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"  # same formula as epic/dist.py
# A100 cluster settings. Failures in a collective abort the job instead of hanging until the time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_ASYNC_ERROR_HANDLING="${NCCL_ASYNC_ERROR_HANDLING:-1}"  # name used by torch < 2.2
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# InfiniBand / RoCE: set these for your fabric (ask your admins or look at `ibstat` / `ip link`):
# export NCCL_IB_HCA=mlx5_0,mlx5_1,mlx5_2,mlx5_3    # the HCAs to use (default: all)
# export NCCL_SOCKET_IFNAME=ib0                     # bootstrap interface; e.g. ^docker,lo to exclude
# export NCCL_IB_GID_INDEX=3                        # RoCE v2
# export NCCL_IB_DISABLE=1                          # no InfiniBand: TCP sockets
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"  # dataloader workers are processes
export TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
export PYTHONFAULTHANDLER=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# srun options: one task per allocated task slot (the #SBATCH --ntasks-per-node, one per GPU); Slurm 22.05
# does not pass --cpus-per-task from sbatch to srun, so give it explicitly.
SRUN=(srun --kill-on-bad-exit=1 --export=ALL)
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && SRUN+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
ARGS=(--ds_config "$DS_CONFIG" --config "$CONFIG" "${TRAINER_ARGS[@]}" "run.dir=$RUN_DIR" "run.name=$RUN_NAME" "${EXTRA[@]}" "$@")

log "job $SLURM_JOB_ID ($SLURM_JOB_NAME) restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_NTASKS:-1} tasks on" \
    "${SLURM_JOB_NUM_NODES:-1} node(s) [$SLURM_JOB_NODELIST], master $MASTER_ADDR:$MASTER_PORT"
log "commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown); run dir $RUN_DIR"
log "$TRAINER ${ARGS[*]}"

# --- 4. Pre-flight on every rank, before heavy work: config, DS JSON, world size, shards, teacher. ---
if [ "${EPIC_PREFLIGHT:-1}" = 1 ]; then
  run_step check "${SRUN[@]}" "$PYTHON" "$TRAINER" --check-only "${ARGS[@]}"
  rc=$?
  [ "$TERMINATED" = 1 ] && exit 143
  [ "$PREEMPTED" = 1 ] && requeue_or_exit
  [ "$rc" = 0 ] || die "pre-flight check failed (exit $rc); the error is above. Nothing was trained."
fi

# --- 5. Train. ---
[ "$PREEMPTED" = 1 ] && requeue_or_exit
run_step train "${SRUN[@]}" "$PYTHON" "$TRAINER" "${ARGS[@]}"
rc=$?
if [ "$PREEMPTED" = 1 ] && [ "$TERMINATED" = 0 ]; then
  [ "$rc" = 0 ] || log "training exited $rc after USR1; requeueing anyway (the last complete checkpoint is intact)"
  requeue_or_exit
fi
log "training exited $rc"
exit "$rc"
