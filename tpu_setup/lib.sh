#!/usr/bin/env bash
# Shared by the tpu_setup scripts (sourced, not run): flags from an env file, checks, and `run`,
# which prints each gcloud command (--dry-run) or runs it and names the command when it fails.

# Settings: flags win over the env file (--env-file, default tpu_setup/tpu.env), which wins over
# the environment. Keys: PROJECT ZONE NAME ACCELERATOR_TYPE RUNTIME_VERSION NUM_SLICES.
DRY_RUN=0
GCLOUD="${GCLOUD:-gcloud}"
# The jax CI tests this checkout with on Python 3.11 (tests/test_tpu_setup.py keeps them equal);
# install.sh pins workers to it, and jax[tpu] brings the libtpu made for it.
TESTED_JAX=0.10.2
ENV_FILE="$(dirname "${BASH_SOURCE[0]}")/tpu.env"

die() {
  echo "error: $*" >&2
  exit 2
}

load_env_file() {
  local file="$1"
  [[ -f "$file" ]] || return 0
  # shellcheck disable=SC1090  # the user's settings file
  source "$file"
}

# The value after a flag, or an error naming the flag.
flag_value() {
  [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"
  printf '%s' "$2"
}

require() {  # require VAR_NAME --flag: the setting must be present
  local var="$1" flag="$2"
  [[ -n "${!var:-}" ]] || die "missing ${flag} (or ${var}=... in ${ENV_FILE}); see --help"
}

check_gcloud() {
  [[ "$DRY_RUN" == 1 ]] && return 0
  command -v "$GCLOUD" > /dev/null 2>&1 \
    || die "gcloud not found on PATH (looked for '${GCLOUD}'): install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), run 'gcloud auth login', or set GCLOUD=/path/to/gcloud"
}

# run CMD ARGS...: print it (dry run) or run it; on failure show gcloud's own error and the command.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
    return 0
  fi
  local err status=0
  err="$(mktemp)"
  # stderr to the terminal and to $err through tee in a pipeline, which is waited for (a process
  # substitution is not: $err could still be empty when read below); stdout stays stdout (fd 3)
  { "$@" 2>&1 1>&3 3>&- | tee "$err" >&2; } 3>&1 || status=$?
  if [[ "$status" == 0 ]]; then
    rm -f "$err"
    return 0
  fi
  echo "error: this command failed (exit ${status}):" >&2
  printf '  %q' "$@" >&2
  echo >&2
  grep -E '^ERROR' "$err" | head -n 5 | sed 's/^/  gcloud said: /' >&2 || true
  rm -f "$err"
  exit "$status"
}

# Node names of a job: NAME alone, or NAME-0 .. NAME-(N-1) for N slices (queued resources' node prefix).
node_names() {
  if [[ "${NUM_SLICES:-1}" -gt 1 ]]; then
    local i
    for ((i = 0; i < NUM_SLICES; i++)); do echo "${NAME}-${i}"; done
  else
    echo "${NAME}"
  fi
}

# parse_common "$@": the flags every script takes; the others are left in REST (in order).
# Each script defines usage() first.
parse_common() {
  local args=("$@") i
  for ((i = 0; i < ${#args[@]}; i++)); do
    if [[ "${args[i]}" == --env-file ]]; then
      ENV_FILE="$(flag_value --env-file "${args[i + 1]:-}")"
      [[ -f "$ENV_FILE" ]] || die "--env-file ${ENV_FILE} does not exist"
    fi
  done
  load_env_file "$ENV_FILE"
  REST=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --name) NAME="$(flag_value "$1" "${2:-}")"; shift 2 ;;
      --zone) ZONE="$(flag_value "$1" "${2:-}")"; shift 2 ;;
      --project) PROJECT="$(flag_value "$1" "${2:-}")"; shift 2 ;;
      --num-slices) NUM_SLICES="$(flag_value "$1" "${2:-}")"; shift 2 ;;
      --env-file) shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h | --help) usage; exit 0 ;;
      --) REST+=("$@"); break ;;
      *) REST+=("$1"); shift ;;
    esac
  done
  NUM_SLICES="${NUM_SLICES:-1}"
  [[ "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]] || die "--num-slices must be a positive integer, got '${NUM_SLICES}'"
  require NAME --name
  require PROJECT --project
  require ZONE --zone
  check_gcloud
}

# ssh_all NODE COMMAND: run a shell command on every worker of a TPU VM or slice at once.
ssh_all() {
  run "$GCLOUD" compute tpus tpu-vm ssh "$1" --zone="$ZONE" --project="$PROJECT" --worker=all --command="$2"
}
