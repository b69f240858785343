#!/usr/bin/env bash
# A real single-node Slurm cluster (munged + slurmctld + slurmd, all as root, no
# systemd, no cgroups, no slurmdbd) from Debian's packages, for CI and for trying
# slurm/pretrain.sh on one machine.
#
#   slurm/local_cluster.sh start    install (if missing) and start; idempotent: if our
#                                   cluster is already up it only waits for the node
#   slurm/local_cluster.sh stop     cancel its jobs, stop slurmd, slurmctld, munged by the
#                                   pids recorded at start (never by name); idempotent
#   slurm/local_cluster.sh status   print daemon pids and node state; exit 0 if up, 3 if not
#
# Afterwards:  source "$LOCAL_SLURM_DIR/env.sh"   (sets SLURM_CONF; `start` also prints it)
#              sbatch --wait slurm/pretrain.sh
#
# Knobs (environment):
#   LOCAL_SLURM_DIR        where config, key, state, logs, pids live  [${TMPDIR:-/tmp}/aion-local-slurm]
#   LOCAL_SLURM_NODENAME   node name    [short hostname if it resolves, else localhost]
#   LOCAL_SLURM_PARTITION  partition    [debug]
#   LOCAL_SLURM_CTLD_PORT  slurmctld port [6817]
#   LOCAL_SLURM_D_PORT     slurmd port    [6818]
#   LOCAL_SLURM_GPUS       fake "gpu" GRES count on the node (no devices), so that
#                          #SBATCH --gres=gpu:N / --gpus-per-node=N scripts are accepted [0]
#   LOCAL_SLURM_CPUS       advertise this many CPUs instead of the real count (oversubscribe,
#                          e.g. 8 so that --ntasks-per-node=8 fits on a 2-core runner) [real]
#   LOCAL_SLURM_INSTALL    1 = apt-get install the packages if missing [1]
#   LOCAL_SLURM_TIMEOUT    seconds to wait for the node to become idle [60]
#   LOCAL_SLURM_MINJOBAGE  seconds a finished job stays visible to scontrol [5]; keep it <= 5
#                          so that `sbatch --wait` keeps polling every 2 s (it backs off
#                          2 -> 8 -> 32 s while sleep_time < MinJobAge/2)
#
# Debian 12 packages: slurmctld slurmd slurm-client munge (slurm 22.05, munge 0.5.15).
set -euo pipefail

DIR=${LOCAL_SLURM_DIR:-${TMPDIR:-/tmp}/aion-local-slurm}
PART=${LOCAL_SLURM_PARTITION:-debug}
CTLD_PORT=${LOCAL_SLURM_CTLD_PORT:-6817}
D_PORT=${LOCAL_SLURM_D_PORT:-6818}
GPUS=${LOCAL_SLURM_GPUS:-0}
TIMEOUT=${LOCAL_SLURM_TIMEOUT:-60}
MINJOBAGE=${LOCAL_SLURM_MINJOBAGE:-5}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

log() { echo "[local_cluster] $*" >&2; }
alive() { [ -s "$DIR/run/$1.pid" ] && kill -0 "$(cat "$DIR/run/$1.pid")" 2>/dev/null; }

# munged refuses a socket unless every directory above it is executable by all ("Socket is
# inaccessible"), and unix socket paths are short (107 bytes). $DIR/munge when it qualifies
# (we chmod $DIR and $DIR/munge 755 ourselves), else a folder of our own under /tmp.
munge_socket_dir() {
  local abs p perm
  abs=$(cd "$DIR" && pwd -P)
  p=$abs
  while [ "$p" != / ]; do
    p=$(dirname "$p")
    perm=$(stat -c %a "$p")
    (( ${perm: -1} & 1 )) || { echo "/tmp/aion-munge-$(printf %s "$abs" | cksum | cut -d' ' -f1)"; return; }
  done
  if (( ${#abs} > 80 )); then echo "/tmp/aion-munge-$(printf %s "$abs" | cksum | cut -d' ' -f1)"
  else echo "$abs/munge"; fi
}

wait_idle() {
  local node=$1 t0=$SECONDS st=""
  while (( SECONDS - t0 < TIMEOUT )); do
    st=$(sinfo -h -N -n "$node" -o '%T' 2>/dev/null | head -n1 || true)
    case "$st" in idle|mixed|allocated) log "node $node is $st"; return 0;; esac
    sleep 0.5
  done
  log "node $node not idle after ${TIMEOUT}s (state='$st')"
  tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
  return 1
}

# daemons run in the foreground, backgrounded by us in their own session; pids recorded
spawn_daemon() {  # name, command...
  local name=$1; shift
  setsid nohup "$@" >"$DIR/log/$name.out" 2>&1 < /dev/null &
  echo $! > "$DIR/run/$name.pid"
}

stop_pid() {  # name: TERM (then KILL) the pid we recorded for it
  local d=$1 pid
  if alive "$d"; then
    pid=$(cat "$DIR/run/$d.pid")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then log "$d ($pid) ignored TERM, KILL"; kill -KILL "$pid" 2>/dev/null || true; fi
    log "stopped $d ($pid)"
  fi
  rm -f "$DIR/run/$d.pid"
}

cmd_start() {
  # ---- 1. packages ---------------------------------------------------------
  local need_install=0 b
  for b in munged munge unmunge slurmctld slurmd sbatch srun sinfo scontrol; do
    command -v "$b" >/dev/null 2>&1 || need_install=1
  done
  if [ "$need_install" = 1 ]; then
    [ "${LOCAL_SLURM_INSTALL:-1}" = 1 ] || { log "slurm/munge not installed (LOCAL_SLURM_INSTALL=0)"; exit 1; }
    command -v apt-get >/dev/null 2>&1 || { log "slurm/munge not installed and no apt-get"; exit 1; }
    log "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  fi

  # ---- 2. already running? -------------------------------------------------
  if alive munged && alive slurmctld && alive slurmd && [ -f "$DIR/nodename" ]; then
    log "already running in $DIR"
    wait_idle "$(cat "$DIR/nodename")"
    echo "export SLURM_CONF=$CONF"
    return 0
  fi
  # half-started leftovers of *our* cluster only (pids we recorded ourselves)
  local d
  for d in slurmd slurmctld munged; do stop_pid "$d"; done

  # ---- 3. node name (must resolve: it becomes MASTER_ADDR) -----------------
  local NODE
  if [ -n "${LOCAL_SLURM_NODENAME:-}" ]; then NODE=$LOCAL_SLURM_NODENAME
  elif getent hosts "$(hostname -s)" >/dev/null 2>&1; then NODE=$(hostname -s)
  else NODE=localhost; fi

  # ports must be free (another cluster on this machine would clash)
  local p
  if command -v ss >/dev/null 2>&1; then
    for p in "$CTLD_PORT" "$D_PORT"; do
      if ss -ltnH "sport = :$p" | grep -q .; then
        log "port $p already in use; set LOCAL_SLURM_CTLD_PORT/LOCAL_SLURM_D_PORT"; exit 1
      fi
    done
  fi

  # ---- 4. directories, munge key, config ------------------------------------
  mkdir -p "$DIR"/{munge,state,spool,run,log}
  chmod 755 "$DIR" "$DIR/munge"   # munged: socket dir must be o+x, not group/other writable
  chmod 700 "$DIR/state"
  if [ ! -s "$DIR/munge/munge.key" ]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
  fi
  chmod 400 "$DIR/munge/munge.key"  # must be owned by the uid munged runs as (root here)
  local SOCK_DIR SOCK
  SOCK_DIR=$(munge_socket_dir)
  mkdir -p "$SOCK_DIR" && chmod 755 "$SOCK_DIR"
  SOCK=$SOCK_DIR/munge.socket
  echo "$SOCK" > "$DIR/munge_socket"
  rm -rf "$DIR/state"/* "$DIR"/spool/* "$DIR/log/jobcomp.txt" 2>/dev/null || true   # cold start: job ids restart at 1

  # hardware as slurmd sees it (CPUs/Boards/Sockets/Cores/Threads/RealMemory)
  # (RealMemory lowered by 5%: a configured value above the detected one drains the node)
  local HW MEM EXTRA="" GRES_LINE="" NODE_GRES="" i
  HW=$(slurmd -C | head -n1 | sed -e 's/^NodeName=[^ ]* //')
  MEM=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$HW")
  HW=$(sed "s/RealMemory=[0-9]*/RealMemory=$(( MEM * 95 / 100 ))/" <<<"$HW")
  if [ -n "${LOCAL_SLURM_CPUS:-}" ]; then
    HW="CPUs=$LOCAL_SLURM_CPUS RealMemory=$(( MEM * 95 / 100 ))"
    EXTRA="SlurmdParameters=config_overrides"   # slurmd: trust slurm.conf, don't drain
  fi
  if [ "$GPUS" -gt 0 ]; then
    GRES_LINE="GresTypes=gpu"; NODE_GRES="Gres=gpu:$GPUS"
    # slurm 22.05 drops file-less GPUs ("Removing file-less GPU"), so give each a
    # dummy char device (a /dev/null clone); slurm then sets CUDA_VISIBLE_DEVICES=0..N-1
    for i in $(seq 0 $((GPUS - 1))); do
      [ -c "$DIR/fake_gpu$i" ] || { rm -f "$DIR/fake_gpu$i"; mknod "$DIR/fake_gpu$i" c 1 3 2>/dev/null || touch "$DIR/fake_gpu$i"; }
    done
    echo "NodeName=$NODE Name=gpu File=$DIR/fake_gpu[0-$((GPUS - 1))]" > "$DIR/gres.conf"
  else
    rm -f "$DIR/gres.conf"
  fi

  # slurmd 22.05 always initialises a cgroup plugin (CgroupPlugin=disabled only exists
  # from 24.05), even with proctrack/linuxproc + task/none, and fails without a usable
  # /sys/fs/cgroup (or on cgroup v2 without systemd/dbus). Point it at a dummy v1 tree;
  # nothing here uses cgroups, so the host's cgroup setup no longer matters.
  mkdir -p "$DIR/fakecg/systemd"
  printf 'CgroupPlugin=cgroup/v1\nCgroupMountpoint=%s\nCgroupAutomount=no\n' "$DIR/fakecg" > "$DIR/cgroup.conf"

  cat > "$CONF" <<EOF
ClusterName=localci
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$D_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.daemon.pid
SlurmdPidFile=$DIR/run/slurmd.daemon.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
EnforcePartLimits=ALL
$EXTRA
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=$MINJOBAGE
$GRES_LINE
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE $HW $NODE_GRES State=UNKNOWN
PartitionName=$PART Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  echo "$NODE" > "$DIR/nodename"
  echo "export SLURM_CONF=$CONF" > "$DIR/env.sh"

  # ---- 5. daemons ------------------------------------------------------------
  spawn_daemon munged munged -F --socket="$SOCK" --key-file="$DIR/munge/munge.key" \
    --log-file="$DIR/log/munged.log" --pid-file="$DIR/run/munged.daemon.pid" \
    --seed-file="$DIR/munge/munged.seed"
  for _ in $(seq 50); do [ -S "$SOCK" ] && break; sleep 0.1; done
  munge -S "$SOCK" -n | unmunge -S "$SOCK" >/dev/null \
    || { log "munged not working"; cat "$DIR/log/munged.out" >&2; exit 1; }

  spawn_daemon slurmctld slurmctld -D -c -i -f "$CONF"      # -c: cold start, no old jobs
  for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
  spawn_daemon slurmd slurmd -D -N "$NODE" -f "$CONF"

  wait_idle "$NODE"
  log "cluster up: $DIR (node $NODE, partition $PART, ports $CTLD_PORT/$D_PORT)"
  echo "export SLURM_CONF=$CONF"
}

cmd_stop() {
  local ids d
  if alive slurmctld; then
    # cancel jobs so that no slurmstepd outlives slurmd
    ids=$(squeue -h -o %i 2>/dev/null || true)
    if [ -n "$ids" ]; then
      # shellcheck disable=SC2086
      scancel --quiet $ids 2>/dev/null || true
    fi
    for _ in $(seq 40); do
      [ -z "$(squeue -h -t running,completing,pending 2>/dev/null || true)" ] && break; sleep 0.25
    done
  fi
  for d in slurmd slurmctld munged; do stop_pid "$d"; done
  local sock
  sock=$(cat "$DIR/munge_socket" 2>/dev/null || echo "$DIR/munge/munge.socket")
  rm -f "$sock" "$sock.lock"
  case "$sock" in /tmp/aion-munge-*/munge.socket) rmdir "$(dirname "$sock")" 2>/dev/null || true;; esac
}

cmd_status() {
  local d up=1 node=""
  for d in munged slurmctld slurmd; do
    if alive "$d"; then echo "$d: running (pid $(cat "$DIR/run/$d.pid"))"
    else echo "$d: stopped"; up=0; fi
  done
  [ -f "$DIR/nodename" ] && node=$(cat "$DIR/nodename")
  if [ "$up" = 1 ]; then
    echo "SLURM_CONF=$CONF"
    sinfo -N -o '%N %P %T %c %G' 2>/dev/null || true
    squeue 2>/dev/null || true
    return 0
  fi
  echo "cluster not running (dir $DIR${node:+, node $node})"
  return 3
}

case "${1:-}" in
  start)  cmd_start ;;
  stop)   cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status   (see the header of this script for the knobs)" >&2; exit 2 ;;
esac
