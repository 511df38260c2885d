#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for trying the batch scripts and for the `slurm` tests.
#
#   sudo deploy/slurm/local-cluster.sh          # install (if missing), configure, start; idempotent
#   sudo deploy/slurm/local-cluster.sh status   # is it up?
#   sudo deploy/slurm/local-cluster.sh stop     # stop the daemons this script started
#
# What it does, in order: installs Debian's slurm-wlm and munge when they are missing; writes a
# minimal /etc/slurm/slurm.conf (unless one exists that this script did not write) with one node
# that has all of this machine's CPUs and one partition `debug`; starts munged, slurmctld and slurmd
# as root (no systemd needed, so it works in containers); waits until the node is idle.
#
# Choices, kept to the minimum a single machine needs:
#   auth/munge            Slurm's standard authentication (a key in /etc/munge/munge.key)
#   proctrack/linuxproc   tracks a job's processes by parent pid: no cgroup set-up required
#   task/none             no CPU binding (cgroups/affinity are what a real cluster configures)
#   select/cons_tres      CPUs are allocated per task, as on GPU clusters (where --gres=gpu:N
#                         also works once a gres.conf lists the GPUs; this machine has none)
#   KillWait=60           seconds between SIGTERM and SIGKILL on scancel or time limit: a worker
#                         needs a few seconds to fail and re-queue its trial
#   partition `urgent`    a higher priority tier on the same node: a job there preempts jobs of
#                         `debug` (PreemptMode=REQUEUE: SIGTERM, GraceTime=30 s, then SIGKILL; the
#                         preempted job is queued again), for trying preemption
# A real cluster's admins own slurm.conf; nothing here is needed there.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by hpsearch deploy/slurm/local-cluster.sh"
STATE=/var/lib/slurm/slurmctld
SPOOL=/var/lib/slurm/slurmd
LOGS=/var/log/slurm
NODE=$(hostname -s)

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "local-cluster.sh: run it as root (it installs packages and starts Slurm's daemons)" >&2
    exit 2
  fi
}

node_idle() {
  # `sinfo` answers only once slurmctld is up; the node is usable once it is idle/mixed/allocated.
  local state
  state=$(sinfo --noheader --nodes="$NODE" --format=%T 2>/dev/null | head -n1) || return 1
  case "$state" in idle|mixed|allocated|completing) return 0 ;; *) return 1 ;; esac
}

install_packages() {
  if [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/munged ]; then return; fi
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y slurm-wlm munge
}

conf_text() {
  local mem_mb
  mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  cat <<EOF
$MARK
ClusterName=local
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
KillWait=60
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
NodeName=$NODE CPUs=$(nproc) RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF
}

conf_current() {
  # Ours and up to date, or someone else's (which is left alone).
  [ -f "$CONF" ] && { ! grep -qF "$MARK" "$CONF" || [ "$(cat "$CONF")" = "$(conf_text)" ]; }
}

write_conf() {
  if conf_current; then return; fi
  mkdir -p /etc/slurm "$STATE" "$SPOOL" "$LOGS"
  conf_text >"$CONF"
  # Daemons running on an older version of it start again with this one.
  stop_slurm
}

start_daemons() {
  mkdir -p /run/munge && chown munge:munge /run/munge
  if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged
  fi
  if ! pgrep -x slurmctld >/dev/null; then /usr/sbin/slurmctld; fi
  if ! pgrep -x slurmd >/dev/null; then /usr/sbin/slurmd; fi
  for _ in $(seq 60); do
    if node_idle; then echo "local-cluster.sh: node $NODE is up (partition debug, $(nproc) CPUs)"; return; fi
    sleep 1
  done
  echo "local-cluster.sh: node $NODE did not become idle in 60 s; see $LOGS/slurmctld.log and slurmd.log" >&2
  sinfo -N -l >&2 || true
  exit 1
}

stop_pidfile() {
  # Stop the daemon whose pid is in $1 and wait until it has exited (slurmctld saves its state).
  local pid
  [ -f "$1" ] || return 0
  pid=$(cat "$1")
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 60); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.5
  done
  echo "local-cluster.sh: pid $pid ($1) did not exit in 30 s" >&2
  exit 1
}

stop_slurm() {
  stop_pidfile /run/slurmd.pid
  stop_pidfile /run/slurmctld.pid
}

case "${1:-up}" in
  up)
    if command -v sinfo >/dev/null && conf_current && node_idle; then echo "local-cluster.sh: already up"; exit 0; fi
    need_root
    install_packages
    write_conf
    start_daemons
    ;;
  status)
    if node_idle; then sinfo; else echo "local-cluster.sh: not up" >&2; exit 1; fi
    ;;
  stop)
    need_root
    stop_slurm
    stop_pidfile /run/munge/munged.pid
    ;;
  *)
    echo "usage: local-cluster.sh [up|status|stop]" >&2
    exit 2
    ;;
esac
