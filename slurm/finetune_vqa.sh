#!/bin/bash
# Fine-tune a pretrained (EPIC-)METER on vqa (config finetune_vqa: METER's fine-tuning settings), 1 node x 8 GPUs.
#   EPIC_RUNS=/scratch/runs EPIC_INIT=/scratch/runs/epic_meter_4m sbatch slurm/finetune_vqa.sh \
#       finetune.train_json=... finetune.val_json=... finetune.images=...      (from the repository root)
# Resubmitting (or the automatic requeue) resumes from $EPIC_RUNS/finetune_vqa; EPIC_RUN_NAME names another run.
#SBATCH --job-name=finetune_vqa
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
L="${EPIC_REPO:-$SLURM_SUBMIT_DIR}/slurm/launch.sh"
[ -f "$L" ] || { echo "cannot find $L: run sbatch from the repository root or export EPIC_REPO" >&2; exit 1; }
EPIC_RUN_CONFIG=finetune_vqa EPIC_FINETUNE_TASK=vqa exec bash "$L" "$@"
