#!/usr/bin/env bash
# What both README commands need first: build dependencies, a release build, the local model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-debian.sh
cargo build --release --quiet
# Through cargo, which knows where it put the binary (CARGO_TARGET_DIR, build.target-dir).
cargo run --release --quiet -- fetch-model
