#!/usr/bin/env bash
# Install this checkout of llm_jax on every worker of a TPU VM / pod slice (all slices with
# --num-slices): ships `git archive HEAD`, makes a Python >= 3.11 venv with jax[tpu] pinned to the jax
# this checkout is tested with, and checks that JAX sees the chips.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

usage() {
  cat <<'USAGE'
usage: tpu_setup/install.sh --name NAME --project PROJECT --zone ZONE [--num-slices N] [--dry-run]

Copies the committed tree (git archive HEAD; uncommitted changes are not shipped, and every worker
gets the same code: llm_jax checks that at start) to ~/llm_jax on every worker, creates
~/llm_jax/.venv with llm_jax[gcs,tpu] and jax[tpu]==TESTED_JAX (lib.sh), and prints each worker's
chips. The venv's Python is the image's python3.11+ if it has one; the stock TPU VM images ship
Python 3.10, and then uv (astral.sh, into ~/.local/bin, no sudo) fetches a standalone Python 3.11.
USAGE
}

parse_common "$@"
[[ ${#REST[@]} -eq 0 ]] || die "unknown argument '${REST[0]}'; see --help"
repo="$(cd "$(dirname "$0")/.." && pwd)"
tarball="${TMPDIR:-/tmp}/llm_jax-$$.tar.gz"
if [[ -n "$(git -C "$repo" status --porcelain --untracked-files=no 2> /dev/null)" ]]; then
  echo "warning: ${repo} has uncommitted changes; workers get the last commit" >&2
fi
run git -C "$repo" archive --format=tar.gz -o "$tarball" HEAD
# shellcheck disable=SC2016  # expanded on the worker
remote='set -e
find ~/llm_jax/llm_jax -name "*.py" -delete 2> /dev/null || true
mkdir -p ~/llm_jax && tar xzf ~/llm_jax.tar.gz -C ~/llm_jax && cd ~/llm_jax
py=""
for cand in python3.11 python3.12 python3.13 python3; do
  if command -v "$cand" > /dev/null && "$cand" -c "import sys; sys.exit(sys.version_info < (3, 11))"; then
    py="$(command -v "$cand")"; break
  fi
done
if [ -z "$py" ]; then
  [ -x ~/.local/bin/uv ] || curl -LsSf https://astral.sh/uv/install.sh | sh
  ~/.local/bin/uv python install 3.11 && py="$(~/.local/bin/uv python find 3.11)"
fi
"$py" -m venv .venv && .venv/bin/pip install -q -U pip
.venv/bin/pip install -q -e ".[gcs,tpu]" "jax[tpu]=='"${TESTED_JAX}"'"
.venv/bin/python -c "import jax, socket, sys; print(socket.gethostname(), sys.version.split()[0], jax.__version__, jax.local_device_count(), jax.local_devices()[0].device_kind)"'
for node in $(node_names); do
  run "$GCLOUD" compute tpus tpu-vm scp "$tarball" "${node}:~/llm_jax.tar.gz" --zone="$ZONE" --project="$PROJECT" \
    --worker=all
  ssh_all "$node" "$remote"
done
[[ "$DRY_RUN" == 1 ]] || rm -f "$tarball"
