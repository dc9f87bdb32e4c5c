#!/usr/bin/env bash
# Runs the C++-facing tests against an AddressSanitizer + UndefinedBehaviorSanitizer build of the
# native extension:
#
#     ./scripts/sanitize.sh [extra pytest arguments]
#
# Needs the .venv of ./scripts/setup.sh and gcc's sanitizer runtimes (libasan, libubsan). The
# sanitized copy of owl2_edge is built into a folder of its own (build/sanitize-target; CMake's
# files in build/sanitize), never over the .venv's editable install, and imported from there.
# Python itself is not instrumented, so the runtimes are preloaded. Leak detection is off: CPython
# keeps much of its memory until exit by design, which LeakSanitizer would report. Any ASan or
# UBSan report stops the test process with a non-zero exit.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
TARGET=build/sanitize-target
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

rm -rf "$TARGET"
"$PY" -m pip install -q --no-build-isolation --no-deps --target "$TARGET" \
    -Ccmake.define.OWL2_SANITIZE=ON -Ccmake.build-type=RelWithDebInfo -Cbuild-dir=build/sanitize .
# The extension finds ggml through its rpath, $ORIGIN/../llama_cpp/lib: the venv's llama_cpp,
# next to it, so that one ggml is loaded (the one llama_cpp uses too).
ln -s "$SITE/llama_cpp" "$TARGET/llama_cpp"

ASAN_RT=$(gcc -print-file-name=libasan.so)
UBSAN_RT=$(gcc -print-file-name=libubsan.so)
[ -e "$ASAN_RT" ] && [ -e "$UBSAN_RT" ] || { echo "gcc's libasan/libubsan not found" >&2; exit 1; }

# python -S: no site-packages .pth files, so the .venv's editable owl2_edge (an import hook and
# the checkout on sys.path) cannot shadow the sanitized copy; the target folder comes first, then
# the .venv's packages. PYTHONSAFEPATH: the working directory (the checkout) is not on sys.path.
export LD_PRELOAD="$ASAN_RT:$UBSAN_RT"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=0:halt_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export PYTHONPATH="$TARGET:$SITE"
export PYTHONSAFEPATH=1
"$PY" -S -c 'import owl2_edge._decoder as d, sys; f = d.__file__; print("sanitized extension:", f); sys.exit(0 if "sanitize-target" in f else 1)'
exec "$PY" -S -m pytest -q -p no:cacheprovider \
    tests/test_decoder.py tests/test_native_build.py tests/test_hostile_gguf.py tests/test_tokenizer.py "$@"
