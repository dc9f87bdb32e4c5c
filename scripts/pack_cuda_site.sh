#!/usr/bin/env bash
# Packs a CUDA wheel of llama-cpp-python (scripts/build_cuda_wheel.sh) as a site folder for
# scripts/gpu_check.sh, small enough to carry: a wheel cannot hold symbolic links, so each ggml
# library is in it six times (libX.so, .so.0, .so.0.25.3, in site-packages/lib for CMake and in
# llama_cpp/lib for run time); identical files become links to one copy. gguf-py and diskcache
# (pure Python) come along.
#   scripts/pack_cuda_site.sh WHEEL OUT.tar.xz
set -euo pipefail
WHEEL=$(realpath "$1")
OUT=$(realpath -m "$2")
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
cd "$TMP"
python3 -m zipfile -e "$WHEEL" site
python3 -m pip download -q --no-deps -d extra gguf diskcache
for w in extra/*.whl; do python3 -m zipfile -e "$w" site; done
python3 - <<'PY'
import hashlib, os
from pathlib import Path
first = {}
files = sorted(Path("site/llama_cpp/lib").glob("*.so*"), key=lambda p: -len(p.name)) + sorted(Path("site/lib").glob("*.so*"))
for f in files:
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    if digest in first:
        target = os.path.relpath(first[digest], f.parent)
        f.unlink()
        f.symlink_to(target)
    else:
        first[digest] = f
PY
cd "$TMP/site"
XZ_OPT=-9T0 tar -cJf "$OUT" .
ls -la "$OUT"
