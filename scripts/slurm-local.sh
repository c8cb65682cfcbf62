#!/usr/bin/env bash
# A throwaway one-node Slurm cluster under DIR, for trying `ablate slurm --submit` on this machine.
#
#   scripts/slurm-local.sh start DIR   start munged, slurmctld and slurmd; wait for the node to be
#                                      idle; print the environment to export (SLURM_CONF)
#   scripts/slurm-local.sh stop DIR    cancel the cluster's jobs and stop the three daemons
#
# Needs Debian's slurm-wlm and munge (apt-get install slurm-wlm) and root: the daemons run as
# root, with every file (key, sockets, pid files, state, spool, logs) under DIR. No accounting
# database: finished jobs stay visible to `scontrol show job` for MinJobAge (10 min), and
# DIR/jobcomp.txt records each job's final state.
set -euo pipefail

usage() {
  echo "usage: $0 start|stop DIR" >&2
  exit 2
}
[ $# -eq 2 ] || usage
action=$1
mkdir -p "$2"
dir=$(cd "$2" && pwd)

# a TCP port on 127.0.0.1 that nothing listens on (bash's /dev/tcp connects when one does)
free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p"
      return
    fi
  done
}

# whether a process runs: it exists and is no zombie (an init that does not reap, as in some
# containers, leaves the ended daemons as zombies)
alive() {
  local state
  state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1)
  [ -n "$state" ] && [ "$state" != Z ]
}

# the pid in a pid file, if that process still runs
running() {
  local pid
  [ -f "$1" ] || return 1
  pid=$(cat "$1")
  [ -n "$pid" ] && alive "$pid" && echo "$pid"
}

start() {
  for prog in munged slurmctld slurmd sinfo; do
    command -v "$prog" >/dev/null || {
      echo "$prog not found: install slurm-wlm and munge" >&2
      exit 1
    }
  done
  if running "$dir/slurmctld.pid" >/dev/null; then
    echo "a cluster already runs under $dir" >&2
    exit 1
  fi
  mkdir -p "$dir/munge" "$dir/state" "$dir/spool" "$dir/log"
  chmod 755 "$dir/munge"

  # munge: a fresh key, and its own socket, pid, seed and log files
  head -c 1024 /dev/urandom >"$dir/munge/munge.key"
  chmod 400 "$dir/munge/munge.key"
  munged --force \
    --key-file="$dir/munge/munge.key" \
    --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munge/munged.pid" \
    --seed-file="$dir/munge/munged.seed" \
    --log-file="$dir/log/munged.log"

  local host node ctld_port slurmd_port
  host=$(hostname -s)
  # this machine's CPUs, cores and memory, as slurmd sees them ("NodeName=host CPUs=… RealMemory=…")
  node=$(slurmd -C | head -1)
  ctld_port=$(free_port)
  slurmd_port=$(free_port)
  while [ "$slurmd_port" = "$ctld_port" ]; do slurmd_port=$(free_port); done

  cat >"$dir/slurm.conf" <<EOF
ClusterName=ablate-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
MinJobAge=600
KillWait=5
InactiveLimit=0
MailProg=/bin/true
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF="$dir/slurm.conf"

  slurmctld -f "$SLURM_CONF"
  slurmd -f "$SLURM_CONF"

  # wait (at most 30 s) for the node to be idle
  local state=""
  for _ in $(seq 60); do
    state=$(sinfo -h -n "$host" -o %t 2>/dev/null || true)
    [ "$state" = idle ] && break
    sleep 0.5
  done
  if [ "$state" != idle ]; then
    echo "the node did not become idle (state: '${state:-none}'); logs in $dir/log:" >&2
    tail -n 20 "$dir"/log/*.log >&2 || true
    exit 1
  fi
  echo "export SLURM_CONF=$SLURM_CONF"
}

stop() {
  export SLURM_CONF="$dir/slurm.conf"
  if running "$dir/slurmctld.pid" >/dev/null; then
    # cancel every job, and wait (at most 15 s) for their processes to end
    local jobs
    jobs=$(squeue -h -o %A 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 30); do
        [ -z "$(squeue -h -o %A 2>/dev/null || true)" ] && break
        sleep 0.5
      done
    fi
  fi
  local pid pidfile
  for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
    if pid=$(running "$pidfile"); then
      kill "$pid"
      for _ in $(seq 20); do
        alive "$pid" || break
        sleep 0.25
      done
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
}

case $action in
  start) start ;;
  stop) stop ;;
  *) usage ;;
esac
