"""Greedy tokens of one GGUF under skipgpt and under llama.cpp's own llama-server, from the
same prompt token ids: the issue's "equal for 64 tokens on at least 9 of 10 prompts".

Each prompt of PROMPTS (one per line, `#` lines skipped) is tokenized by `skipgpt tokenize`;
llama-server (built by ../shared/tools/build_llama_tools.sh) continues the ids greedily
(`/completion`, temperature 0) and so does `skipgpt generate --prompt-ids`. Both stop at the
end-of-turn token (llama.cpp's `ignore_eos` forbids it, ours would generate past it, so
neither is used); a prompt counts as equal when both give the same tokens, 64 or fewer.

    python3 tools/compare_llama_cpp.py GGUF [--prompts data/prompts/continuations.txt] [--n 10]
        [--tokens 64] [--threads 2] [--json OUT] [--llama-args "-ctk f32 -ctv f32"]

`--versus-llama ARGS` puts a second llama-server (`--versus-bin`, the same build unless given,
with ARGS) where skipgpt was: how far llama.cpp agrees with itself when only the order of its
floating-point sums changes, the floor under the comparison with skipgpt.
"""
import argparse
import json
import os
import shlex
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


def start_server(llama_bin, gguf, threads, port, extra=()):
    env = dict(os.environ, LD_LIBRARY_PATH=llama_bin)
    proc = subprocess.Popen(
        [f"{llama_bin}/llama-server", "-m", gguf, "-t", str(threads), "--port", str(port),
         "-c", "2048", "-np", "1", *extra],
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
    ap.add_argument("--llama-args", default="", help="more llama-server arguments")
    ap.add_argument("--versus-llama", help="compare with llama-server run with these arguments")
    ap.add_argument("--versus-bin", help="the second llama-server's build [--llama-bin]")
    ap.add_argument("--json")
    a = ap.parse_args()
    prompts = [l.strip() for l in open(a.prompts) if l.strip() and not l.startswith("#")][: a.n]
    port = free_port()
    server = start_server(a.llama_bin, a.gguf, a.threads, port, shlex.split(a.llama_args))
    versus = None
    if a.versus_llama is not None:
        versus_port = free_port()
        versus = start_server(a.versus_bin or a.llama_bin, a.gguf, a.threads, versus_port,
                              shlex.split(a.versus_llama))
    rows = []
    try:
        for text in prompts:
            ids = json.loads(subprocess.check_output(
                [a.skipgpt, "tokenize", "--model", a.gguf, "--text", text, "--json"]))["ids"]
            theirs = post(f"http://127.0.0.1:{port}/completion", {
                "prompt": ids, "n_predict": a.tokens, "temperature": 0, "top_k": 1,
                "cache_prompt": False, "return_tokens": True})["tokens"]
            if versus is None:
                ours = json.loads(subprocess.check_output(
                    [a.skipgpt, "--threads", str(a.threads), "generate", "--model", a.gguf,
                     "--prompt-ids", ",".join(map(str, ids)), "--max-new-tokens", str(a.tokens),
                     "--json"]))["tokens"]
            else:
                ours = post(f"http://127.0.0.1:{versus_port}/completion", {
                    "prompt": ids, "n_predict": a.tokens, "temperature": 0, "top_k": 1,
                    "cache_prompt": False, "return_tokens": True})["tokens"]
            same = next((i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y),
                        min(len(ours), len(theirs)))
            equal = ours == theirs
            rows.append({"prompt": text, "equal": equal, "equal_prefix": same,
                         "ours": ours, "llama_cpp": theirs})
            print(f"{'equal' if equal else 'DIFFER'} {same:3d}/{len(theirs)}  {text[:60]}", flush=True)
    finally:
        server.kill()
        if versus is not None:
            versus.kill()
    whole = sum(r["equal"] for r in rows)
    print(f"{whole} of {len(rows)} prompts give the same tokens (up to {a.tokens}) "
          f"({os.path.basename(a.gguf)})")
    if a.json:
        json.dump({"gguf": a.gguf, "tokens": a.tokens, "whole": whole,
                   "llama_args": a.llama_args, "versus_llama": a.versus_llama, "rows": rows},
                  open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
