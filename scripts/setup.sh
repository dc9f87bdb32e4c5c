#!/usr/bin/env bash
# Sets up owl2-edge in ./.venv from the package registries: torch (CPU build, for conversion
# only), llama-cpp-python (compiled once, ~7 min on 2 cores; pip caches the wheel), the native
# decoder and the rest. Re-running it is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build; the package's own `convert`
# extra takes any release in a range that this one satisfies.
python -m pip install -q torch==2.13.0
# llama-cpp-python is pinned exactly: its ggml is the ggml our decoder links against. Set
# CMAKE_ARGS="-DGGML_CUDA=on" before running this script for an NVIDIA GPU build.
python -m pip install -q -e '.[convert,dev,ray,video]'
# The chat page's browser test (tests/test_serve_page.py) drives Debian's Chromium through
# Playwright (the dev extra); Playwright's own browser download is not used. Without root or apt
# the test skips and says why.
if ! command -v chromium >/dev/null; then
  skip="the chat page's browser test will skip"
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    # A fresh machine may have no package lists yet: update only when the install needs it.
    { apt-get install -y -qq chromium \
        || { apt-get update -qq && apt-get install -y -qq chromium; }; } >/dev/null 2>&1 \
      || echo "note: apt-get could not install chromium; $skip"
  else
    echo "note: no chromium, and not root with apt-get to install it; $skip"
  fi
fi
python -c "import owl2_edge._decoder, llama_cpp, torch, onnxruntime, av; print('owl2-edge is set up in .venv')"
