#!/usr/bin/env bash
# Start one training command on every worker at once (every slice with --num-slices), in the
# background, logging to ~/llm_jax.log; every worker joins through JAX's own cluster detection.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

usage() {
  cat <<'USAGE'
usage: tpu_setup/launch.sh --name NAME --project PROJECT --zone ZONE [--num-slices N] [--dry-run]
                           -- TRAIN_ARGS...
e.g.   tpu_setup/launch.sh --name run1 -- --config llama-1b run_dir=/home/$USER/runs/l1 \
           train.checkpoint_dir=gs://my-bucket/l1/checkpoints mesh.fsdp=-1

TRAIN_ARGS go to `python train.py` on every worker, with distributed.coordinator=auto added
(unless they set it): jax.distributed.initialize() then finds the workers, their ranks and worker
0's address from the TPU VM metadata server, as JAX's cluster detection does on Cloud TPU, and the
preemption notice reaches every worker through its sync manager. Relaunching the same command
after a preemption resumes from the newest checkpoint (keep checkpoints in gs://: a spot VM's disk
goes with it). With N slices, each slice gets MEGASCALE_* variables (slice 0's first worker
coordinates) and TRAIN_ARGS must set mesh.dcn_data=N.
USAGE
}

parse_common "$@"
set -- "${REST[@]}"
[[ "${1:-}" == -- ]] && shift
[[ $# -gt 0 ]] || die "give the training arguments after --, e.g. -- --config llama-1b run_dir=..."
[[ " $* " == *" distributed.coordinator="* ]] || set -- "$@" distributed.coordinator=auto
train_args="$(printf '%q ' "$@")"
if [[ "$NUM_SLICES" -gt 1 ]]; then
  [[ " $* " == *" mesh.dcn_data=${NUM_SLICES} "* ]] \
    || die "a ${NUM_SLICES}-slice job needs mesh.dcn_data=${NUM_SLICES} in the training arguments"
  if [[ "$DRY_RUN" == 1 ]]; then
    run "$GCLOUD" compute tpus tpu-vm describe "${NAME}-0" --zone="$ZONE" --project="$PROJECT" \
      --format="value(networkEndpoints[0].ipAddress)"
    coordinator='SLICE0_WORKER0_IP'
  else
    coordinator="$(run "$GCLOUD" compute tpus tpu-vm describe "${NAME}-0" --zone="$ZONE" --project="$PROJECT" \
      --format="value(networkEndpoints[0].ipAddress)")"
  fi
fi
slice=0
for node in $(node_names); do
  env=""
  if [[ "$NUM_SLICES" -gt 1 ]]; then
    env="export MEGASCALE_COORDINATOR_ADDRESS=${coordinator}:8080 MEGASCALE_NUM_SLICES=${NUM_SLICES} MEGASCALE_SLICE_ID=${slice} MEGASCALE_PORT=8080; "
  fi
  ssh_all "$node" "${env}cd ~/llm_jax && nohup .venv/bin/python train.py ${train_args}> ~/llm_jax.log 2>&1 < /dev/null &"
  slice=$((slice + 1))
done
echo "launched on every worker of $(node_names | tr '\n' ' '); follow with tpu_setup/logs.sh --name ${NAME}" >&2
