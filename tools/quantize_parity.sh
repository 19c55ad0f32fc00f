#!/usr/bin/env bash
# `skipgpt quantize` against llama.cpp's own `llama-quantize`: every type both write, from the
# same F32 SmolLM2 file (the one tools/bench_quantized.sh makes; run it first), compared tensor
# by tensor and key by key with tools/compare_gguf.py (the `gguf` PyPI package).
#
#   tools/quantize_parity.sh [PYTHON]        # results in docs/data/quantize-parity/
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
bin=$(bash ../shared/tools/build_llama_tools.sh)
export LD_LIBRARY_PATH="$bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
work=target/quantize-parity source=target/bench-quantized/f32.gguf out=docs/data/quantize-parity
mkdir -p "$work" "$out"
: > "$out/summary.txt"
for type in q8_0 q6_k q5_k_m q5_0 q5_1 q4_k_m q4_0 q4_1 f16; do
  upper=$(echo "$type" | tr a-z A-Z)
  "$bin/llama-quantize" "$source" "$work/lc-$type.gguf" "$upper" 2 > "$work/lc-$type.log" 2>&1
  target/release/skipgpt quantize --model "$source" --type "$type" --out "$work/sg-$type.gguf" \
    > "$work/sg-$type.log" 2>&1
  "$python" tools/compare_gguf.py "$work/sg-$type.gguf" "$work/lc-$type.gguf" \
    --json "$out/$type.json" | tee -a "$out/summary.txt" || true
done
