#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for testing the sbatch scripts in slurm/ for real.
#
#   tools/local_slurm.sh start    install slurm-wlm + munge if missing (apt-get), write the config, start munged,
#                                 slurmctld and slurmd, wait until the node is idle; prints `export SLURM_CONF=...`
#   tools/local_slurm.sh stop     stop the daemons by PID (only the ones this script started)
#   tools/local_slurm.sh status   print the daemons' PIDs and `sinfo`; exit 0 when the cluster is up
#   tools/local_slurm.sh env      print `export SLURM_CONF=...` (use: eval "$(tools/local_slurm.sh env)")
#
# All files (slurm.conf, state, logs, pid files, a private munge socket) live in $EPIC_SLURM_DIR
# (default /tmp/epic-slurm); nothing in /etc is changed. `start` is idempotent (a running cluster is left alone),
# and so is `stop`. Needs root (it starts daemons as root and may run apt-get). Environment:
#   EPIC_SLURM_DIR         private directory                          [/tmp/epic-slurm]
#   EPIC_SLURM_PORT        slurmctld port; slurmd uses PORT+1           [6817]
#   EPIC_SLURM_NO_INSTALL  1: never run apt-get, fail if Slurm is missing
#   EPIC_SLURM_GPUS        fake GPUs (gres) the node advertises, so the #SBATCH --gpus-per-node lines of the
#                          real scripts are accepted; the jobs still run on the CPU      [8]
#
# Choices, all checked on a 2-core Debian 12 container without systemd or cgroups (see docs/cluster.md):
# proctrack/linuxproc + task/none (no cgroup plugins), munge on its own socket, select/cons_tres with CR_CPU,
# requeue allowed (JobRequeue=1), short credential expiry and scheduler delays so a requeued job restarts within
# seconds instead of ~2 minutes, EnforcePartLimits=ALL so impossible requests fail at submission instead of
# pending forever.
set -euo pipefail

D="${EPIC_SLURM_DIR:-/tmp/epic-slurm}"
PORT="${EPIC_SLURM_PORT:-6817}"
NGPU="${EPIC_SLURM_GPUS:-8}"
CONF="$D/slurm.conf"
MUNGE_SOCKET="$D/munge/munge.socket"
PIDS=("$D/run/slurmd.pid" "$D/run/slurmctld.pid" "$D/munge/munged.pid")

log() { echo "[local_slurm] $*" >&2; }
die() { echo "[local_slurm] ERROR: $*" >&2; exit 1; }

pid_alive() {  # pid file -> 0 when the process named in it runs (and is not a zombie)
  local pid
  pid="$(cat "$1" 2>/dev/null)" || return 1
  [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
  ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null
}

install_slurm() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
     && command -v munged >/dev/null; then
    return
  fi
  [ "${EPIC_SLURM_NO_INSTALL:-0}" = 1 ] && die "Slurm is not installed and EPIC_SLURM_NO_INSTALL=1. Install it with: apt-get install -y slurm-wlm munge"
  command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get: install slurm-wlm and munge by hand"
  [ "$(id -u)" = 0 ] || die "installing Slurm needs root (apt-get install -y slurm-wlm munge)"
  log "installing slurm-wlm and munge with apt-get (about 15 s)"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
}

write_config() {
  local host cpus mem_mb
  host="$(hostname -s)"
  cpus="$(nproc)"
  mem_mb="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
  mkdir -p "$D"/{state,spool,run,log,dev}
  local gres_node="" gres_types=""
  if [ "$NGPU" -gt 0 ]; then
    gres_types="GresTypes=gpu"
    gres_node="Gres=gpu:$NGPU"
    local i
    for ((i = 0; i < NGPU; i++)); do : > "$D/dev/nvidia$i"; done  # plain files: accepted as gres, no CUDA
    echo "NodeName=$host Name=gpu File=$D/dev/nvidia[0-$((NGPU - 1))]" > "$D/gres.conf"
  else
    : > "$D/gres.conf"
  fi
  cat > "$CONF" <<EOF
# Written by tools/local_slurm.sh: a single-node test cluster. Do not use in production.
ClusterName=epiclocal
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
PreemptMode=REQUEUE
PreemptType=preempt/partition_prio
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=1
EnforcePartLimits=ALL
SlurmdParameters=config_overrides
MailProg=/bin/true
$gres_types
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb $gres_node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munged() {
  pid_alive "$D/munge/munged.pid" && return
  mkdir -p "$D/munge"
  chown munge:munge "$D/munge"
  chmod 755 "$D/munge"  # munged refuses a socket directory writable by others
  [ -r /etc/munge/munge.key ] || die "/etc/munge/munge.key is missing (reinstall munge: apt-get install --reinstall munge)"
  runuser -u munge -- munged --socket="$MUNGE_SOCKET" --pid-file="$D/munge/munged.pid" \
    --log-file="$D/munge/munged.log" --seed-file="$D/munge/munged.seed" --key-file=/etc/munge/munge.key \
    || die "munged did not start; see $D/munge/munged.log"
}

start_daemons() {
  if ! pid_alive "$D/run/slurmctld.pid"; then
    rm -rf "$D/state" "$D/spool"; mkdir -p "$D/state" "$D/spool"  # fresh state: job ids from 1, no drained node
    slurmctld -f "$CONF" || die "slurmctld did not start; see $D/log/slurmctld.log"
  fi
  if ! pid_alive "$D/run/slurmd.pid"; then
    slurmd -f "$CONF" || die "slurmd did not start; see $D/log/slurmd.log"
  fi
}

wait_idle() {
  local state="" i
  for ((i = 0; i < 300; i++)); do
    state="$(SLURM_CONF="$CONF" sinfo -h -o %T 2>/dev/null | head -n1 || true)"
    case "$state" in idle|mixed|allocated|completing) return 0 ;; esac
    sleep 0.1
  done
  die "the node did not become idle within 30 s (state: '${state:-none}'). Logs: $D/log/"
}

cluster_up() {
  pid_alive "$D/munge/munged.pid" && pid_alive "$D/run/slurmctld.pid" && pid_alive "$D/run/slurmd.pid" \
    && SLURM_CONF="$CONF" sinfo -h >/dev/null 2>&1
}

cmd_start() {
  [ "$(id -u)" = 0 ] || die "start needs root (the daemons run as root in this test setup)"
  if cluster_up; then
    log "already running ($CONF)"
  else
    install_slurm
    # A half-dead cluster (one daemon died): stop what is left, then start from a fresh config.
    cmd_stop >/dev/null 2>&1 || true
    write_config
    start_munged
    start_daemons
    wait_idle
    log "up: $(SLURM_CONF="$CONF" sinfo -h -o '%P %D %T %c CPUs %G')"
  fi
  echo "export SLURM_CONF=$CONF"
}

cmd_stop() {
  local f pid i
  for f in "${PIDS[@]}"; do
    if pid_alive "$f" && pid="$(cat "$f" 2>/dev/null)"; then
      kill "$pid" 2>/dev/null || true
      for ((i = 0; i < 100; i++)); do pid_alive "$f" || break; sleep 0.1; done
      pid_alive "$f" && { log "pid $pid ($f) ignored SIGTERM; sending SIGKILL"; kill -9 "$pid" 2>/dev/null || true; }
    fi
    rm -f "$f"
  done
  log "stopped"
}

cmd_status() {
  local f name
  for f in "${PIDS[@]}"; do
    name="$(basename "$f" .pid)"
    if pid_alive "$f"; then echo "$name: running (pid $(cat "$f"))"; else echo "$name: not running"; fi
  done
  if cluster_up; then
    echo "SLURM_CONF=$CONF"
    SLURM_CONF="$CONF" sinfo
    SLURM_CONF="$CONF" squeue
    return 0
  fi
  return 1
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
