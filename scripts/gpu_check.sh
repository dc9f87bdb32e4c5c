#!/usr/bin/env bash
# The GPU checks of the decoder, for a machine with an NVIDIA GPU that cannot reach PyPI: it needs
# Python with torch, pytest, onnx, sentencepiece, pillow, typer, rich, nanobind,
# scikit-build-core, cmake and a C++ compiler, plus a CUDA build of llama-cpp-python==0.3.36
# unpacked as a site folder and packed by scripts/pack_cuda_site.sh (or that site folder itself,
# as scripts/gpu_check_from_source.sh makes it on the GPU machine).
#
#   scripts/gpu_check.sh CUDA_SITE.tar.xz|SITE_DIR OUT_DIR [--bench | --bench-only]
#
# GPU_CHECK_TEST_SECONDS bounds the test run (default 420).
#
# Writes OUT_DIR/gpu.txt (the device), build.log, tests.log (the decoder, pipeline and CLI tests,
# GPU ones included) and, with --bench, bench.log (a 7B-shaped Q4_0 model generated and converted
# there, then `owl2 bench --only decoder`: our decoder against stock llama.cpp on the GPU, same
# file).
set -uo pipefail
TARBALL=$1
OUT=$2
BENCH=${3:-}
REPO=$(cd "$(dirname "$0")/.." && pwd)
SITE=/tmp/owl2-site
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
if [ -d "$TARBALL" ]; then
  SITE=$(cd "$TARBALL" && pwd)
else
  mkdir -p "$SITE"
  tar -xJf "$TARBALL" -C "$SITE"
fi
export PYTHONPATH=$SITE
# Import owl2_edge from $SITE (with the built extension), never from the checkout: PYTHONSAFEPATH
# keeps the current folder off sys.path, in this process and in the CLI processes tests start.
export PYTHONSAFEPATH=1
# ggml-cuda needs cuBLAS and the CUDA runtime: from the pip nvidia-* packages that come with
# torch there, or the toolkit's own.
NV_LIBS=$(python3 -c "import glob, os, nvidia; print(':'.join(sorted(glob.glob(os.path.join(list(nvidia.__path__)[0], '*', 'lib')))))" 2>/dev/null || true)
export LD_LIBRARY_PATH=${NV_LIBS}:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
cd "$REPO"
# Our extension, built against the CUDA ggml in $SITE (CMakeLists.txt asks Python where it is).
python3 -m pip install --no-index --no-deps --no-build-isolation --target "$SITE" . > "$OUT/build.log" 2>&1 ||
  { tail -40 "$OUT/build.log"; exit 1; }
python3 -c "import owl2_edge._decoder, owl2_edge; print(owl2_edge.__file__)" || exit 1
[ "$BENCH" = "--bench-only" ] || timeout "${GPU_CHECK_TEST_SECONDS:-420}" python3 -m pytest -q -p no:cacheprovider -rs tests/test_decoder.py tests/test_decoder_sequences.py tests/test_pipeline.py \
  tests/test_cli_ask.py tests/test_native_build.py 2>&1 | tee "$OUT/tests.log" | tail -15
if [ "$BENCH" = "--bench" ] || [ "$BENCH" = "--bench-only" ]; then
  W=/tmp/owl2-bench
  mkdir -p $W
  (time python3 benchmarks/bench_convert.py $W --quant Q4_0 --vision fp32) > "$OUT/bench.log" 2>&1
  python3 -m owl2_edge.cli bench -m $W/owl2-7b-Q4_0 --device cuda --threads 16 --only decoder \
    >> "$OUT/bench.log" 2>&1
  tail -12 "$OUT/bench.log"
fi
