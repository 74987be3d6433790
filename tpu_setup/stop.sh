#!/usr/bin/env bash
# Stop the training job on every worker: SIGTERM, so every host saves the same step and exits
# (as on a preemption); the TPU VMs keep running.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

usage() {
  cat <<'USAGE'
usage: tpu_setup/stop.sh --name NAME --project PROJECT --zone ZONE [--num-slices N] [--dry-run]
USAGE
}

parse_common "$@"
[[ ${#REST[@]} -eq 0 ]] || die "unknown argument '${REST[0]}'; see --help"
for node in $(node_names); do
  ssh_all "$node" "pkill -TERM -f 'python train.py' || echo 'no training process on this worker'"
done
