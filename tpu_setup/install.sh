#!/usr/bin/env bash
# Install this checkout of llm_jax on every worker of a TPU VM / pod slice (all slices with
# --num-slices): ships `git archive HEAD`, makes a venv with jax[tpu] and checks that JAX sees the chips.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

usage() {
  cat <<'USAGE'
usage: tpu_setup/install.sh --name NAME --project PROJECT --zone ZONE [--num-slices N] [--dry-run]

Copies the committed tree (git archive HEAD; uncommitted changes are not shipped, and every worker
gets the same code: llm_jax checks that at start) to ~/llm_jax on every worker, creates
~/llm_jax/.venv with llm_jax[gcs] and jax[tpu], and prints each worker's chips.
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
remote='set -e
find ~/llm_jax/llm_jax -name "*.py" -delete 2> /dev/null || true
mkdir -p ~/llm_jax && tar xzf ~/llm_jax.tar.gz -C ~/llm_jax && cd ~/llm_jax
python3 -m venv .venv && .venv/bin/pip install -q -U pip
.venv/bin/pip install -q -e ".[gcs]" "jax[tpu]"
.venv/bin/python -c "import jax, socket; print(socket.gethostname(), jax.local_device_count(), jax.local_devices()[0].device_kind)"'
for node in $(node_names); do
  run "$GCLOUD" compute tpus tpu-vm scp "$tarball" "${node}:~/llm_jax.tar.gz" --zone="$ZONE" --project="$PROJECT" \
    --worker=all
  ssh_all "$node" "$remote"
done
[[ "$DRY_RUN" == 1 ]] || rm -f "$tarball"
