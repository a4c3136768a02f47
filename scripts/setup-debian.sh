#!/usr/bin/env bash
# Installs what building promptmill needs on a fresh Debian machine that has the Rust toolchain:
# cmake and a C/C++ compiler for llama.cpp, libclang for its bindings. With --test, also what
# the tests need: Chromium, for the report's browser test (not for the quick start: it is
# large). Does nothing when all are present.
set -euo pipefail
tests=0
[ "${1:-}" = "--test" ] && tests=1
need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v clang >/dev/null 2>&1 || need+=(clang)
command -v c++ >/dev/null 2>&1 || need+=(g++)
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || need+=(libclang-dev)
command -v python3 >/dev/null 2>&1 || need+=(python3 python3-pip)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
if [ "$tests" -eq 1 ] && [ ! -x /usr/bin/chromium ]; then need+=(chromium); fi
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
