#!/usr/bin/env bash
# The runtime-only lane: owl2-edge installed as a user without the converter installs it
# (`pip install '.[dev]'`: a real wheel, not editable, and no torch, onnx or sentencepiece), then
# the test suite from this checkout. Tests that need the converter skip; the rest must pass, the
# wheel and no-torch checks of tests/test_package.py among them.
#   scripts/runtime_lane.sh [VENV]      (default .venv-runtime)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-runtime}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# Its own build folder: the editable install of scripts/setup.sh keeps build/<wheel tag>.
"$VENV/bin/python" -m pip install -q --config-settings=build-dir=build/runtime-lane '.[dev]'
if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "runtime lane: torch is installed in $VENV; this lane must run without it" >&2
  exit 1
fi
# The installed package, never this checkout's sources: pytest puts tests/ on sys.path, not the root.
"$VENV/bin/pytest" -q -p no:cacheprovider -rfs | tail -30
