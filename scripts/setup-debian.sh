#!/usr/bin/env bash
# Installs what building promptmill needs on a fresh Debian machine that has the Rust toolchain:
# cmake and a C/C++ compiler for llama.cpp, libclang for its bindings. With --test, also what
# the tests need: Chromium, for the report's browser test; moto and Azurite, the object-store
# tests' local S3 and Azure Blob servers (none is needed for the quick start). Does nothing when
# all are present.
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
# The object-store tests' local S3 server: moto's moto_server, from PyPI (pinned; it serves on
# 127.0.0.1 and needs no network once installed).
if [ "$tests" -eq 1 ] && ! command -v moto_server >/dev/null 2>&1; then
  echo "installing: moto[server] (PyPI)" >&2
  python3 -m pip install --quiet --disable-pip-version-check 'moto[server]==5.2.1' \
    || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages 'moto[server]==5.2.1'
  # A user install puts moto_server in ~/.local/bin.
  command -v moto_server >/dev/null 2>&1 || export PATH="$HOME/.local/bin:$PATH"
fi
# The az:// tests' local Azure Blob server: Microsoft's Azurite, from npm (pinned).
if [ "$tests" -eq 1 ] && ! command -v azurite-blob >/dev/null 2>&1; then
  if ! command -v npm >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq nodejs npm >/dev/null
  fi
  echo "installing: azurite (npm)" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo npm install -g --silent azurite@3.37.0
fi
