#!/usr/bin/env bash
# The GPU check on a GPU machine that has no CUDA build of llama-cpp-python and cannot reach PyPI:
# build one there from its source (scripts/build_cuda_wheel.sh takes ~40 min on 2 cores; a
# many-core GPU machine takes minutes), unpack it as a site folder with gguf-py and diskcache,
# then run scripts/gpu_check.sh on it. Needs what gpu_check.sh needs, plus nvcc and cuBLAS (the
# CUDA toolkit's, or PyPI's nvidia-cublas there).
#
#   scripts/gpu_check_from_source.sh SRC.tar.xz WHEELS_DIR OUT_DIR [gpu_check.sh's flag]
#
# SRC.tar.xz: llama-cpp-python-0.3.36/ (its source package, unpacked and packed again; the
# vendored llama.cpp's models/ and docs/ may be left out). WHEELS_DIR: gguf and diskcache wheels.
# CUDA_ARCHS (default 90: H100/H200); BUILD_SECONDS bounds the build (default 420).
set -uo pipefail
SRC=$(realpath "$1")
WHEELS=$(realpath "$2")
OUT=$3
FLAG=${4:-}
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=/tmp/owl2-cuda-build
SITE=$WORK/site
mkdir -p "$OUT" "$WORK/src" "$WORK/wheel" "$SITE"
OUT=$(cd "$OUT" && pwd)
tar -xJf "$SRC" -C "$WORK/src"
# cuBLAS: the toolkit's when it has one, else PyPI's nvidia-cublas (CUDA 13 layout).
CUBLAS_ARGS=""
if [ ! -f /usr/local/cuda/include/cublas_v2.h ]; then
  CUBLAS=$(python3 -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13'))")
  CUBLAS_ARGS="-DCUDA_cublas_LIBRARY=$(ls "$CUBLAS"/lib/libcublas.so.* | head -1) \
 -DCUDA_cublasLt_LIBRARY=$(ls "$CUBLAS"/lib/libcublasLt.so.* | head -1) \
 -DCMAKE_CUDA_FLAGS=-I$CUBLAS/include -DCMAKE_CXX_FLAGS=-I$CUBLAS/include"
fi
# The flags of scripts/build_cuda_wheel.sh: portable CPU code, no link to the driver library.
export CMAKE_ARGS="-DGGML_CUDA=on -DGGML_CUDA_NO_VMM=ON -DGGML_NATIVE=OFF \
 -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHS:-90} $CUBLAS_ARGS"
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
export PATH=/usr/local/cuda/bin:$PATH
start=$(date +%s)
timeout "${BUILD_SECONDS:-420}" python3 -m pip wheel --no-build-isolation --no-deps --no-index \
  -w "$WORK/wheel" "$WORK/src/llama-cpp-python-0.3.36" > "$OUT/llama-build.log" 2>&1 ||
  { tail -30 "$OUT/llama-build.log"; echo "llama-cpp-python's CUDA build failed or ran out of time"; exit 1; }
echo "llama-cpp-python CUDA build: $(( $(date +%s) - start )) s on $(nproc) cores" | tee "$OUT/llama-build-time.txt"
for w in "$WORK"/wheel/llama_cpp_python-*.whl "$WHEELS"/*.whl; do
  python3 -m zipfile -e "$w" "$SITE" || exit 1
done
"$REPO/scripts/gpu_check.sh" "$SITE" "$OUT" $FLAG
