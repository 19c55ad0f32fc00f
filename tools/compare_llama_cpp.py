"""Greedy tokens of one GGUF under skipgpt and under llama.cpp's own llama-server, from the
same prompt token ids: the issue's "equal for 64 tokens on at least 9 of 10 prompts".

Each prompt of PROMPTS (one per line, `#` lines skipped) is tokenized by `skipgpt tokenize`;
llama-server (built by ../shared/tools/build_llama_tools.sh) continues the ids greedily
(`/completion`, temperature 0) and so does `skipgpt generate --prompt-ids`. Both stop at the
end-of-turn token (llama.cpp's `ignore_eos` forbids it, ours would generate past it, so
neither is used); a prompt counts as equal when both give the same tokens, 64 or fewer.

    python3 tools/compare_llama_cpp.py GGUF [--prompts data/prompts/continuations.txt] [--n 10]
        [--tokens 64] [--threads 2] [--json OUT]
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def start_server(llama_bin, gguf, threads, port):
    env = dict(os.environ, LD_LIBRARY_PATH=llama_bin)
    proc = subprocess.Popen(
        [f"{llama_bin}/llama-server", "-m", gguf, "-t", str(threads), "--port", str(port),
         "-c", "2048", "-np", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    sys.exit("llama-server did not come up")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--prompts", default="data/prompts/continuations.txt")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skipgpt", default="target/release/skipgpt")
    ap.add_argument("--llama-bin", default=os.path.expanduser("~/.cache/llama.cpp/bin"))
    ap.add_argument("--json")
    a = ap.parse_args()
    prompts = [l.strip() for l in open(a.prompts) if l.strip() and not l.startswith("#")][: a.n]
    port = free_port()
    server = start_server(a.llama_bin, a.gguf, a.threads, port)
    rows = []
    try:
        for text in prompts:
            ids = json.loads(subprocess.check_output(
                [a.skipgpt, "tokenize", "--model", a.gguf, "--text", text, "--json"]))["ids"]
            theirs = post(f"http://127.0.0.1:{port}/completion", {
                "prompt": ids, "n_predict": a.tokens, "temperature": 0, "top_k": 1,
                "cache_prompt": False, "return_tokens": True})["tokens"]
            out = json.loads(subprocess.check_output(
                [a.skipgpt, "--threads", str(a.threads), "generate", "--model", a.gguf,
                 "--prompt-ids", ",".join(map(str, ids)), "--max-new-tokens", str(a.tokens),
                 "--json"]))
            ours = out["tokens"]
            same = next((i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y),
                        min(len(ours), len(theirs)))
            equal = ours == theirs
            rows.append({"prompt": text, "equal": equal, "equal_prefix": same,
                         "ours": ours, "llama_cpp": theirs})
            print(f"{'equal' if equal else 'DIFFER'} {same:3d}/{len(theirs)}  {text[:60]}", flush=True)
    finally:
        server.kill()
    whole = sum(r["equal"] for r in rows)
    print(f"{whole} of {len(rows)} prompts give the same tokens (up to {a.tokens}) "
          f"({os.path.basename(a.gguf)})")
    if a.json:
        json.dump({"gguf": a.gguf, "tokens": a.tokens, "whole": whole, "rows": rows},
                  open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
