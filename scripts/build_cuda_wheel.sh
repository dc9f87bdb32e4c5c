#!/usr/bin/env bash
# Builds a CUDA wheel of llama-cpp-python==0.3.36 (its ggml is what owl2-edge's decoder runs on)
# on a machine that has nvcc but no cuBLAS: PyPI's nvidia-cublas provides cuBLAS's headers and
# libraries. Install the result with `pip install --force-reinstall --no-deps WHEEL` in .venv,
# then rebuild owl2-edge (`pip install --no-build-isolation -e .`): the decoder then finds the
# CUDA device through ggml's backend registry at run time, with no CUDA code of its own.
#
#   CUDA_ARCHS="90" ./scripts/build_cuda_wheel.sh OUT_DIR      (90 = H100/H200; e.g. "86;89;90")
set -euo pipefail
OUT=${1:-dist-cuda}
ARCHS=${CUDA_ARCHS:-90}
JOBS=${JOBS:-$(nproc)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

python3 -m venv "$WORK/venv"
. "$WORK/venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "nvidia-cublas>=13,<14" scikit-build-core cmake ninja
CUBLAS=$(python -c "import nvidia.cu13, os; print(os.path.dirname(nvidia.cu13.__file__) + '/cu13')" 2>/dev/null ||
         python -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13'))")
[ -f "$CUBLAS/include/cublas_v2.h" ] || { echo "cublas_v2.h not found under $CUBLAS" >&2; exit 1; }
LIB=$(ls "$CUBLAS"/lib/libcublas.so.* | head -1)
LIBLT=$(ls "$CUBLAS"/lib/libcublasLt.so.* | head -1)

# GGML_NATIVE=OFF: the CPU code must run on the GPU machine's processor, not only this one's.
# GGML_CUDA_NO_VMM=ON: no link to the driver library (libcuda.so), which a machine without a GPU
# driver lacks; ggml then uses its plain memory pool instead of virtual-memory pools.
export CMAKE_ARGS="-DGGML_CUDA=on -DGGML_CUDA_NO_VMM=ON -DGGML_NATIVE=OFF -DCMAKE_CUDA_ARCHITECTURES=$ARCHS \
 -DCUDA_cublas_LIBRARY=$LIB -DCUDA_cublasLt_LIBRARY=$LIBLT \
 -DCMAKE_CUDA_FLAGS=-I$CUBLAS/include -DCMAKE_CXX_FLAGS=-I$CUBLAS/include"
export CMAKE_BUILD_PARALLEL_LEVEL=$JOBS
# --no-cache-dir: pip would otherwise reuse a cached CPU-only build of the same version.
python -m pip wheel --no-cache-dir --no-deps -w "$OUT" "llama-cpp-python==0.3.36" -v 2>&1 | tail -n 40
ls -la "$OUT"
