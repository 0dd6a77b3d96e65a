#!/usr/bin/env bash
# A throwaway one-node SLURM on this host, for the SLURM tests (tests/e2e/test_slurm*.py).
#
#   eval "$(scripts/local_slurm.sh start)"   # prints: export SLURM_CONF=<folder>/slurm.conf
#   sinfo; sbatch ...; pytest tests/e2e/test_slurm_e2e.py
#   scripts/local_slurm.sh stop              # stops what `start` started, removes the folder
#   scripts/local_slurm.sh env               # prints the export line again
#
# `start` installs Debian's slurm-wlm, slurmdbd, munge and mariadb-server with apt-get
# when they are missing (needs root), then starts, from a fresh folder
# ($KNNVQ_LOCAL_SLURM_DIR, default /tmp/knnvq-local-slurm):
#   munged      with its own key, on munge's default socket /run/munge/munge.socket.2
#               (slurm 22.05 ignores AuthInfo=socket= on its slurmdbd connections); a
#               munged that already answers there is used instead, and left running
#   mariadbd    its own data folder and port, for slurmdbd (submitit follows jobs with
#               sacct, which needs job accounting)
#   slurmdbd, slurmctld, slurmd
#               one node (this host, CPUs=2 unless KNNVQ_LOCAL_SLURM_CPUS is set),
#               one partition "local", ProctrackType=proctrack/linuxproc,
#               TaskPlugin=task/none, SelectType=select/cons_tres (no cgroups needed)
# Clients find this cluster through SLURM_CONF only. Ports: $KNNVQ_LOCAL_SLURM_PORT
# (default 16817) and the next three numbers.
# `stop` cancels the cluster's jobs, then ends exactly the processes whose pid files
# `start` wrote, and removes the folder. It is safe to call when nothing runs.
set -euo pipefail

DIR=${KNNVQ_LOCAL_SLURM_DIR:-/tmp/knnvq-local-slurm}
PORT=${KNNVQ_LOCAL_SLURM_PORT:-16817}
CPUS=${KNNVQ_LOCAL_SLURM_CPUS:-2}
CLUSTER=knnvq
PARTITION=local
DB_PASS=knnvq-local
# Daemons in the order they start; `stop` ends them in reverse.
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)

say() { echo "local_slurm: $*" >&2; }
die() { say "error: $*"; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    die "$1 needs root and sudo is missing; run this script as root"
  fi
}

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurm-wlm)
  command -v slurmdbd >/dev/null || missing+=(slurmdbd)
  command -v munged >/dev/null || missing+=(munge)
  command -v mariadbd >/dev/null || missing+=(mariadb-server)
  [ ${#missing[@]} = 0 ] && return
  say "installing ${missing[*]} with apt-get"
  as_root apt-get update -qq >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# Waits up to $2 seconds for the command "$3..." to succeed; fails naming $1's log.
wait_for() {
  local what=$1 seconds=$2; shift 2
  for _ in $(seq "$((seconds * 2))"); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  die "$what did not come up within ${seconds}s; its log: $DIR/log/$what.log (tail below)
$(tail -n 20 "$DIR/log/$what.log" 2>/dev/null)"
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

write_configs() {
  local host=$1 mem
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
  cat >"$DIR/slurm.conf" <<EOF
# Written by scripts/local_slurm.sh: a one-node cluster for tests, removed by \`stop\`.
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$((PORT + 2))
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
MinJobAge=30
NodeName=$host NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$((PORT + 2))
SlurmUser=root
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((PORT + 3))
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$DIR/slurmdbd.conf"
}

start() {
  if [ -f "$DIR/slurm.conf" ]; then
    die "$DIR already holds a local SLURM; run '$0 stop' first (or set KNNVQ_LOCAL_SLURM_DIR)"
  fi
  for p in "$PORT" $((PORT + 1)) $((PORT + 2)) $((PORT + 3)); do
    port_free "$p" || die "port $p is in use; set KNNVQ_LOCAL_SLURM_PORT to a free range of 4 ports"
  done
  install_packages
  local host
  host=$(hostname -s)
  mkdir -p "$DIR"/{munge,state,spool,run,log,mysql}
  chmod 700 "$DIR/munge"
  write_configs "$host"
  export SLURM_CONF=$DIR/slurm.conf

  if munge -n >/dev/null 2>&1; then
    say "using the munged that already answers on munge's default socket"
  else
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$DIR/munge/munge.key"
    mkdir -p /run/munge
    munged --force --key-file="$DIR/munge/munge.key" --pid-file="$DIR/run/munged.pid" \
      --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed"
    wait_for munged 20 munge -n
  fi

  # mariadb for slurmdbd
  mariadb-install-db --user=root --datadir="$DIR/mysql" --auth-root-authentication-method=socket \
    >"$DIR/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed; see $DIR/log/mariadb-install.log"
  mariadbd --no-defaults --user=root --datadir="$DIR/mysql" --socket="$DIR/run/mysql.sock" \
    --port=$((PORT + 3)) --bind-address=127.0.0.1 --pid-file="$DIR/run/mariadbd.pid" \
    --log-error="$DIR/log/mariadbd.log" --skip-log-bin --innodb-buffer-pool-size=64M >/dev/null 2>&1 &
  wait_for mariadbd 60 mariadb --no-defaults --socket="$DIR/run/mysql.sock" -e "select 1"
  mariadb --no-defaults --socket="$DIR/run/mysql.sock" -e \
    "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
     CREATE USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"

  slurmdbd
  wait_for slurmdbd 60 sacctmgr -n list cluster
  sacctmgr -i add cluster "$CLUSTER" >/dev/null

  slurmctld
  wait_for slurmctld 60 scontrol ping
  slurmd
  wait_for slurmd 60 bash -c "sinfo -h -N -o %T | grep -qE '^(idle|mixed|allocated)'"
  say "running: partition $PARTITION, node $host with $CPUS CPUs; logs in $DIR/log"
  echo "export SLURM_CONF=$SLURM_CONF"
}

pid_of() { [ -s "$DIR/run/$1.pid" ] && cat "$DIR/run/$1.pid"; }

stop() {
  if [ ! -d "$DIR/run" ]; then say "nothing to stop in $DIR"; return 0; fi
  export SLURM_CONF=$DIR/slurm.conf
  if [ -n "$(pid_of slurmctld || true)" ] && scontrol ping >/dev/null 2>&1; then
    # the jobs of this cluster (the cluster is this script's) end before the daemons
    local jobs
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      say "cancelling jobs $(echo $jobs)"
      scancel $jobs || true
      for _ in $(seq 60); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
    fi
  fi
  local i name pid
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
    name=${DAEMONS[$i]}
    pid=$(pid_of "$name" || true)
    [ -n "$pid" ] || continue
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      if kill -0 "$pid" 2>/dev/null; then say "$name ($pid) ignored SIGTERM for 20 s; SIGKILL"; kill -9 "$pid" || true; fi
    fi
    say "stopped $name ($pid)"
  done
  rm -rf "$DIR"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  env) [ -f "$DIR/slurm.conf" ] || die "no local SLURM in $DIR; run '$0 start'"; echo "export SLURM_CONF=$DIR/slurm.conf" ;;
  *) echo "usage: $0 start|stop|env  (see the header of this file)" >&2; exit 2 ;;
esac
