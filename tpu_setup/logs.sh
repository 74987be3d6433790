#!/usr/bin/env bash
# Show the training log of one worker (default 0, which logs for the job) or of all of them.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

usage() {
  cat <<'USAGE'
usage: tpu_setup/logs.sh --name NAME --project PROJECT --zone ZONE [--worker N|all] [--lines N]
                         [--follow] [--num-slices N] [--dry-run]
USAGE
}

WORKER=0
LINES=100
FOLLOW=""
parse_common "$@"
set -- "${REST[@]}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --worker) WORKER="$(flag_value "$1" "${2:-}")"; shift 2 ;;
    --lines) LINES="$(flag_value "$1" "${2:-}")"; shift 2 ;;
    --follow) FOLLOW="-f"; shift ;;
    *) die "unknown argument '$1'; see --help" ;;
  esac
done
[[ "$WORKER" =~ ^([0-9]+|all)$ ]] || die "--worker must be a number or all"
[[ "$LINES" =~ ^[0-9]+$ ]] || die "--lines must be a number"
node="$(node_names | head -n 1)"
run "$GCLOUD" compute tpus tpu-vm ssh "$node" --zone="$ZONE" --project="$PROJECT" --worker="$WORKER" \
  --command="tail -n ${LINES} ${FOLLOW} ~/llm_jax.log"
