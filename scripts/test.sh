#!/usr/bin/env bash
# The README's second command: the whole test suite (unit, integration against the fake
# OpenAI server on 127.0.0.1, and the real embedded model). Release mode, because the
# llama.cpp engine is unusably slow unoptimised and is built once for both.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$HOME/.local/bin:$PATH"
scripts/prepare.sh --test
cargo test --release --workspace
