#!/usr/bin/env bash
# Delete the TPU VM / pod slice (or the queued resource and all its slices). Local disks go with
# it: keep checkpoints in gs:// (train.checkpoint_dir).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

usage() {
  cat <<'USAGE'
usage: tpu_setup/delete.sh --name NAME --project PROJECT --zone ZONE [--queued] [--num-slices N] [--dry-run]

  --queued   the TPU was created with --queued (or --num-slices): delete the queued resource
USAGE
}

QUEUED=0
parse_common "$@"
set -- "${REST[@]}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --queued) QUEUED=1; shift ;;
    *) die "unknown argument '$1'; see --help" ;;
  esac
done
if [[ "$QUEUED" == 1 || "$NUM_SLICES" -gt 1 ]]; then
  run "$GCLOUD" compute tpus queued-resources delete "$NAME" --zone="$ZONE" --project="$PROJECT" --force --quiet
else
  run "$GCLOUD" compute tpus tpu-vm delete "$NAME" --zone="$ZONE" --project="$PROJECT" --quiet
fi
