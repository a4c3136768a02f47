#!/usr/bin/env bash
# What both README commands need first: build dependencies, a release build, the local model.
# --test (from scripts/test.sh): also what only the tests need.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-debian.sh "$@"
cargo build --release --quiet
# Through cargo, which knows where it put the binary (CARGO_TARGET_DIR, build.target-dir).
cargo run --release --quiet -- fetch-model
