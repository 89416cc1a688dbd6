#!/usr/bin/env bash
# Build the llama-cpp-python wheel once per machine into a cache that pip installs from.
#
# Why not a plain `pip install llama-cpp-python`: its default build compiles llama.cpp with
# -march=native, which on CPUs with AMX turns on ggml's AMX matmul, and that path segfaults here
# (quantized models crash in ggml_backend_amx_mul_mat: the sandbox does not grant AMX tile state).
# We build for every other instruction set the CPU reports, so llama.cpp keeps its AVX2/AVX-512
# and repacked kernels and stays a fair reference for speed.
set -euo pipefail
version="$1"; wheel_dir="$2"; python="$3"
if ls "$wheel_dir"/llama_cpp_python-"$version"-*.whl >/dev/null 2>&1; then exit 0; fi
mkdir -p "$wheel_dir"

flags="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
cpu=$(grep -m1 '^flags' /proc/cpuinfo || true)
for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx512f:AVX512 avx512vbmi:AVX512_VBMI \
            avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16 avx_vnni:AVX_VNNI; do
  if grep -qw "${pair%%:*}" <<<"$cpu"; then flags+=" -DGGML_${pair##*:}=ON"; else flags+=" -DGGML_${pair##*:}=OFF"; fi
done
flags+=" -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
echo "[setup] building llama-cpp-python $version (once per machine, about 8 minutes on 2 cores)" >&2
echo "[setup] CMAKE_ARGS=$flags" >&2
CMAKE_ARGS="$flags" "$python" -m pip wheel --disable-pip-version-check --no-deps --no-cache-dir -q \
  -w "$wheel_dir" "llama-cpp-python==$version"
