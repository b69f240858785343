#!/usr/bin/env bash
#SBATCH --job-name=aion-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#
# Multi-node pretraining with aion-train under Slurm.
#
# Default (LAUNCHER=torchrun): one task per node (ntasks-per-node=1 above); srun starts one
# `torchrun --nnodes $SLURM_NNODES --nproc_per_node $NPROC_PER_NODE --node_rank $SLURM_NODEID`
# per node with a static rendezvous at the first node of the allocation, and torchrun starts
# the local ranks.
# LAUNCHER=srun: Slurm itself starts one task per rank (srun --ntasks-per-node=$NPROC_PER_NODE);
# each task maps SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID to RANK/WORLD_SIZE/LOCAL_RANK.
#
# Submit from the repository root (or pass --chdir=REPO); #SBATCH values are defaults that
# sbatch flags override:
#   sbatch slurm/pretrain.sh                                   # 2 nodes x 8 GPUs
#   CONFIG=configs/big.yaml EXTRA="train.steps=20000" sbatch --nodes=4 slurm/pretrain.sh
#   sbatch slurm/pretrain.sh train.steps=100 train.lr=1e-3     # arguments = more overrides
# On the one-node CPU cluster of slurm/local_cluster.sh (no GPUs, 2 cores):
#   source "${TMPDIR:-/tmp}/aion-local-slurm/env.sh"
#   sbatch --wait --nodes=1 --gpus-per-node=0 --cpus-per-task=2 --output=slurm-%j.out \
#          --export=ALL,EXTRA="train.steps=30" slurm/pretrain.sh
#
# Environment (sbatch passes the submitting shell's environment; or --export=ALL,VAR=...):
#   CONFIG          config file                                   [configs/tiny_cpu.yaml]
#   RUN_DIR         run directory (checkpoints/, mlflow.db)        [runs/<job name>-<job id>]
#   EXTRA           dotted config overrides, space separated      [none]
#   NPROC_PER_NODE  ranks per node; GPUS_PER_NODE is an alias     [GPUs on the node from
#                   SLURM_GPUS_ON_NODE or nvidia-smi, else 2 (CPU)]
#   LAUNCHER        torchrun | srun                               [torchrun]
#   PYTHON          interpreter with aion_train installed         [python on PATH, else python3]
#   MASTER_PORT     rendezvous port                               [20000 + job id % 20000]
#   OMP_NUM_THREADS threads per rank                              [CPUs per node / ranks per node]
#   JSON            1 = rank 0 prints a one-line JSON summary      [1]
#   REPO_DIR        cd here first                                 [the job's working directory]
set -euo pipefail

case "${LAUNCHER:-torchrun}" in
  torchrun|srun) ;;
  *) echo "pretrain.sh: LAUNCHER must be torchrun or srun, not '$LAUNCHER'" >&2; exit 2 ;;
esac
if [ -z "${SLURM_JOB_ID:-}" ] || [ -z "${SLURM_JOB_NODELIST:-}" ]; then
  echo "pretrain.sh: not inside a Slurm job; submit it with sbatch (or run it under salloc)" >&2
  exit 2
fi
[ -n "${REPO_DIR:-}" ] && cd "$REPO_DIR"

CONFIG=${CONFIG:-configs/tiny_cpu.yaml}
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME:-aion-pretrain}-${SLURM_JOB_ID}}
EXTRA=${EXTRA:-}
LAUNCHER=${LAUNCHER:-torchrun}
JSON=${JSON:-1}
PYTHON=${PYTHON:-$(command -v python || command -v python3 || echo python3)}
NNODES=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}

# ---- ranks per node: explicit, else the GPUs Slurm gave us, else the GPUs we see, else 2 ---
gpu_count() {
  local n=0
  if [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ "${SLURM_GPUS_ON_NODE}" -gt 0 ] 2>/dev/null; then
    n=$SLURM_GPUS_ON_NODE
  elif command -v nvidia-smi >/dev/null 2>&1; then
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  fi
  echo "${n:-0}"
}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  if [ -n "${GPUS_PER_NODE:-}" ]; then NPROC_PER_NODE=$GPUS_PER_NODE
  else
    NPROC_PER_NODE=$(gpu_count)
    [ "$NPROC_PER_NODE" -gt 0 ] || NPROC_PER_NODE=2   # CPU: 2 gloo ranks per node
  fi
fi

# ---- CPUs: the launcher task's CPUs (one task per node) are shared by the node's ranks -----
CPUS_PER_NODE=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-$(nproc)}}
CPUS_PER_RANK=$(( CPUS_PER_NODE / NPROC_PER_NODE ))
(( CPUS_PER_RANK >= 1 )) || CPUS_PER_RANK=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$CPUS_PER_RANK}

# ---- rendezvous: first node of the allocation, port from the job id -----------------------
# (sed reads all of scontrol's output: no SIGPIPE under pipefail, unlike head -n1)
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
export MASTER_ADDR MASTER_PORT
export WORLD_SIZE=$(( NNODES * NPROC_PER_NODE ))
export PYTHONUNBUFFERED=1
export CONFIG RUN_DIR PYTHON NPROC_PER_NODE NNODES

# EXTRA is split on whitespace (one override per word, no globbing); script arguments follow
read -r -a OVERRIDES <<<"$EXTRA"
OVERRIDES+=("$@")
TRAIN=(-m aion_train.cli pretrain --config "$CONFIG" "run_dir=$RUN_DIR" "${OVERRIDES[@]}")
[ "$JSON" = 1 ] && TRAIN+=(--json)

echo "[pretrain.sh] job $SLURM_JOB_ID: $NNODES node(s) x $NPROC_PER_NODE rank(s) = $WORLD_SIZE," \
     "launcher $LAUNCHER, master $MASTER_ADDR:$MASTER_PORT, OMP_NUM_THREADS=$OMP_NUM_THREADS"
echo "[pretrain.sh] $PYTHON ${TRAIN[*]}"
mkdir -p "$RUN_DIR"

case "$LAUNCHER" in
  torchrun)
    # one torchrun per node; its node rank is only known inside the step (SLURM_NODEID)
    srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 \
         --cpus-per-task="$CPUS_PER_NODE" --kill-on-bad-exit=1 \
      bash -c 'exec "$PYTHON" -m torch.distributed.run --rdzv-backend=static \
                 --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" --node_rank "$SLURM_NODEID" \
                 --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$@"' \
        aion-torchrun "${TRAIN[@]}"
    ;;
  srun)
    # one Slurm task per rank. The job was allocated one task per node, so ask for the
    # node's CPUs split between its ranks (overcommit if there are more ranks than CPUs).
    SRUN_CPU=(--cpus-per-task="$CPUS_PER_RANK")
    (( CPUS_PER_NODE >= NPROC_PER_NODE )) || SRUN_CPU+=(--overcommit)
    srun --nodes="$NNODES" --ntasks="$WORLD_SIZE" --ntasks-per-node="$NPROC_PER_NODE" \
         "${SRUN_CPU[@]}" --kill-on-bad-exit=1 \
      bash -c 'export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID \
                      LOCAL_WORLD_SIZE=$NPROC_PER_NODE GROUP_RANK=$SLURM_NODEID NODE_RANK=$SLURM_NODEID
               exec "$PYTHON" "$@"' \
        aion-rank "${TRAIN[@]}"
    ;;
esac
echo "[pretrain.sh] done: $RUN_DIR"
