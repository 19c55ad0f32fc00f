#!/usr/bin/env bash
# skipgpt against llama.cpp on the same GGUF files, for quality rather than speed: perplexity
# with llama-perplexity's own scoring (`skipgpt perplexity`, 40 chunks of 512 tokens of the
# general text from tools/make_general_text.py) and greedy tokens from the same prompt ids
# (tools/compare_llama_cpp.py). The files are those tools/bench_quantized.sh makes (F32, and
# Q8_0 and Q4_K_M by llama-quantize); run it first. The floor under the greedy comparison:
# llama.cpp against itself with its attention computed another way (flash attention off), and
# with its KV cache in f32 instead of f16 (flash attention off in both).
#
#   tools/llama_cpp_parity.sh [THREADS]      # results in docs/data/llama-cpp-parity/
#   (LLAMA_BIN=dir and SKIPGPT_BIN=path as for tools/bench_quantized.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
bin=${LLAMA_BIN:-$(bash ../shared/tools/build_llama_tools.sh)}
export LD_LIBRARY_PATH="$bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
work=target/ppl files=target/bench-quantized out=docs/data/llama-cpp-parity
sg=${SKIPGPT_BIN:-target/release/skipgpt}
mkdir -p "$work" "$out"
[ -f "$work/general.jsonl" ] || python3 tools/make_general_text.py "$work/general.jsonl" "$work/debs"
python3 - "$work" <<'PY'
import json, sys
docs = [json.loads(line)["text"] for line in open(f"{sys.argv[1]}/general.jsonl")]
open(f"{sys.argv[1]}/general.txt", "w").write("\n\n".join(docs)[:200000])
PY
for f in f32 lc-q8_0 lc-q4_k_m; do
  "$bin/llama-perplexity" -m "$files/$f.gguf" -f "$work/general.txt" -c 512 --chunks 40 -t "$threads" \
    2>&1 | grep -E "calculating perplexity|Final estimate" > "$out/llama-perplexity-$f.txt"
  $sg --threads "$threads" perplexity --model "$files/$f.gguf" -f "$work/general.txt" -c 512 \
    --chunks 40 --json > "$out/skipgpt-perplexity-$f.json"
  python3 tools/compare_llama_cpp.py "$files/$f.gguf" --threads "$threads" --skipgpt "$sg" \
    --llama-bin "$bin" --json "$out/greedy-$f.json" | tail -1
done
for f in f32 lc-q8_0 lc-q4_k_m; do
  echo "$f: llama.cpp $(grep -o 'PPL = .*' "$out/llama-perplexity-$f.txt"), skipgpt $(python3 -c "import json; d = json.load(open('$out/skipgpt-perplexity-$f.json')); print(f\"{d['perplexity']:.4f} +/- {d['perplexity_error']:.5f}\")")"
done
for f in f32 lc-q8_0 lc-q4_k_m; do
  python3 tools/compare_llama_cpp.py "$files/$f.gguf" --threads "$threads" --llama-bin "$bin" \
    --versus-llama="-fa off" --json "$out/greedy-llama-fa-on-vs-off-$f.json" | tail -1
done
python3 tools/compare_llama_cpp.py "$files/lc-q8_0.gguf" --threads "$threads" --llama-bin "$bin" \
  --llama-args="-fa off" --versus-llama="-fa off -ctk f32 -ctv f32" \
  --json "$out/greedy-llama-f16-vs-f32-cache-lc-q8_0.json" | tail -1
