#!/usr/bin/env bash
# Start this node's process of a multi-node GPU job without a scheduler: run it on every node with
# the same coordinator (node 0's address and a free port) and its own rank. SLURM users: see
# slurm_train.sbatch. Same code path as a TPU pod: jax.distributed joins the processes.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

usage() {
  cat <<'USAGE'
usage: tpu_setup/gpu_node.sh --coordinator HOST:PORT --num-nodes N --rank R [--dry-run] -- TRAIN_ARGS...
e.g.   node 0: tpu_setup/gpu_node.sh --coordinator 10.0.0.2:1234 --num-nodes 2 --rank 0 -- --config llama-1b run_dir=/shared/runs/l1
       node 1: tpu_setup/gpu_node.sh --coordinator 10.0.0.2:1234 --num-nodes 2 --rank 1 -- --config llama-1b run_dir=/shared/runs/l1
Each node uses all its GPUs; run_dir (or train.checkpoint_dir) must be on storage every node sees.
USAGE
}

COORDINATOR="" NODES="" RANK=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --coordinator) COORDINATOR="$(flag_value "$1" "${2:-}")"; shift 2 ;;
    --num-nodes) NODES="$(flag_value "$1" "${2:-}")"; shift 2 ;;
    --rank) RANK="$(flag_value "$1" "${2:-}")"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown argument '$1'; see --help" ;;
  esac
done
[[ "$COORDINATOR" =~ ^[^:]+:[0-9]+$ ]] || die "--coordinator must be HOST:PORT (node 0's address), got '${COORDINATOR}'"
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--num-nodes must be a positive integer"
[[ "$RANK" =~ ^[0-9]+$ && "$RANK" -lt "$NODES" ]] || die "--rank must be in 0..$((NODES - 1)), got '${RANK}'"
[[ $# -gt 0 ]] || die "give the training arguments after --, e.g. -- --config llama-1b run_dir=..."
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-${repo}/.venv/bin/python}"
run "$python" "${repo}/train.py" "$@" "distributed.coordinator=${COORDINATOR}" \
  "distributed.num_processes=${NODES}" "distributed.process_id=${RANK}"
