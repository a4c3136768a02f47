#!/usr/bin/env bash
# The README's first command: install what is missing, build, fetch the local model once, and
# run the quick-start job on it, offline. Prints the summary and where the outputs are.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
scripts/prepare.sh
# Through cargo, which knows where it put the binary (CARGO_TARGET_DIR, build.target-dir).
cargo run --release --quiet -- run jobs/quickstart.toml "$@"
