#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice (on-demand, spot, or through queued resources; N slices for
# multi-slice data parallelism), after checking that the zone offers the accelerator type.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

usage() {
  cat <<'USAGE'
usage: tpu_setup/create.sh --name NAME --project PROJECT --zone ZONE --accelerator-type TYPE
                           [--runtime-version VERSION] [--spot] [--queued] [--num-slices N]
                           [--env-file FILE] [--dry-run]

  --accelerator-type  e.g. v5litepod-16 (v5e, 16 chips), v5p-32, v4-8
  --runtime-version   TPU VM image (default: v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5 for v5p,
                      tpu-ubuntu2204-base otherwise)
  --spot              spot capacity: cheaper, may be preempted (training resumes: see README.md)
  --queued            request through queued resources (waits for capacity instead of failing)
  --num-slices N      N slices as one queued resource (nodes NAME-0 .. NAME-(N-1)); implies --queued
  --dry-run           print the gcloud commands instead of running them
Settings may also come from tpu_setup/tpu.env (PROJECT=..., ZONE=..., ACCELERATOR_TYPE=...).
USAGE
}

SPOT=0
QUEUED=0
parse_common "$@"
set -- "${REST[@]}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --accelerator-type) ACCELERATOR_TYPE="$(flag_value "$1" "${2:-}")"; shift 2 ;;
    --runtime-version) RUNTIME_VERSION="$(flag_value "$1" "${2:-}")"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --queued) QUEUED=1; shift ;;
    *) die "unknown argument '$1'; see --help" ;;
  esac
done
require ACCELERATOR_TYPE --accelerator-type
if [[ -z "${RUNTIME_VERSION:-}" ]]; then
  case "$ACCELERATOR_TYPE" in
    v5litepod-* | v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    *) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
  esac
fi
[[ "$NUM_SLICES" -gt 1 ]] && QUEUED=1

# The zone must offer the type; gcloud's own error otherwise names little.
if [[ "$DRY_RUN" == 1 ]]; then
  run "$GCLOUD" compute tpus accelerator-types list --zone="$ZONE" --project="$PROJECT" --format="value(type)"
else
  offered="$(run "$GCLOUD" compute tpus accelerator-types list --zone="$ZONE" --project="$PROJECT" \
    --format="value(type)")"
  grep -qx -- "$ACCELERATOR_TYPE" <<< "$offered" \
    || die "zone ${ZONE} does not offer accelerator type ${ACCELERATOR_TYPE}; it offers: $(tr '\n' ' ' <<< "$offered")"
fi

spot_flag=()
[[ "$SPOT" == 1 ]] && spot_flag=(--spot)
if [[ "$QUEUED" == 1 ]]; then
  nodes=(--node-id="$NAME")
  [[ "$NUM_SLICES" -gt 1 ]] && nodes=(--node-count="$NUM_SLICES" --node-prefix="$NAME")
  run "$GCLOUD" compute tpus queued-resources create "$NAME" --zone="$ZONE" --project="$PROJECT" \
    "${nodes[@]}" --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "${spot_flag[@]}"
  echo "requested ${NAME} (${NUM_SLICES} x ${ACCELERATOR_TYPE}); watch it with:" >&2
  echo "  gcloud compute tpus queued-resources describe ${NAME} --zone=${ZONE} --project=${PROJECT}" >&2
else
  run "$GCLOUD" compute tpus tpu-vm create "$NAME" --zone="$ZONE" --project="$PROJECT" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${spot_flag[@]}"
fi
