"""The benchmark's anchors: llama.cpp (llama-cpp-python) and HF transformers, timed the way
`examples/bench_real.rs` times the project, on the same weights, threads and token ids.

    python tools/bench_anchors.py --system llamacpp --gguf SmolLM2-f32.gguf --ids ids.json --threads 2 --out r.json
    python tools/bench_anchors.py --system transformers --hf DIR --ids ids.json --threads 2 --out r.json

`ids.json` (written by bench_real) holds the prefill prompt and the decode prompts as token
ids, so every system sees the same tokens. Figures, each the median of --repeats runs after a
warm-up:
- load: seconds from nothing to a model ready to run;
- prefill: tokens/s of one forward pass over the prefill prompt (batch 1);
- decode at batch b: new tokens/s of greedy generation of --decode tokens per sequence from the
  b decode prompts (prompt processing included, as in the project's figure);
- peak RSS of the process (it runs one system).

llama-cpp-python's high-level API decodes one sequence at a time, so llama.cpp has no batch-8
figure here.
"""
import argparse, json, resource, statistics, time


def median_time(repeats, fn):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def llamacpp(a, ids):
    import llama_cpp

    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=a.gguf, n_threads=a.threads, n_threads_batch=a.threads,
                          n_ctx=len(ids["prefill"]) + a.decode + 64, n_batch=512, n_ubatch=512,
                          logits_all=False, verbose=False)
    load = time.perf_counter() - t
    prompt = ids["prefill"]

    def prefill():
        llm.reset()
        llm.eval(prompt)

    t_prefill = median_time(a.repeats, prefill)
    first = ids["decode"][0]

    def decode():
        llm.reset()
        n = 0
        for _ in llm.generate(first, top_k=1, temp=0.0, reset=True):
            n += 1
            if n == a.decode:
                break

    t_decode = median_time(a.repeats, decode)
    return {"load_s": load, "prefill_tok_s": len(prompt) / t_prefill,
            "decode": {"1": a.decode / t_decode}, "version": llama_cpp.__version__}


def transformers_(a, ids):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.hf, dtype=torch.float32).eval()
    load = time.perf_counter() - t
    prompt = torch.tensor([ids["prefill"]])

    def prefill():
        with torch.no_grad():
            model(prompt, use_cache=False)

    t_prefill = median_time(a.repeats, prefill)
    decode = {}
    for b in a.batches:
        x = torch.tensor(ids["decode"][:b])

        def run():
            with torch.no_grad():
                model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=a.decode,
                               min_new_tokens=a.decode, do_sample=False, pad_token_id=0)

        decode[str(b)] = b * a.decode / median_time(a.repeats, run)
    return {"load_s": load, "prefill_tok_s": prompt.shape[1] / t_prefill, "decode": decode,
            "version": f"transformers {transformers.__version__}, torch {torch.__version__}"}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--system", choices=["llamacpp", "transformers"], required=True)
    p.add_argument("--gguf")
    p.add_argument("--hf")
    p.add_argument("--ids", required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", required=True)
    p.add_argument("--name", help="the system's name in the results (default: --system)")
    a = p.parse_args()
    ids = json.load(open(a.ids))
    r = llamacpp(a, ids) if a.system == "llamacpp" else transformers_(a, ids)
    r["system"] = a.name or a.system
    r["threads"] = a.threads
    r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    json.dump(r, open(a.out, "w"), indent=1)
    print(json.dumps(r))


if __name__ == "__main__":
    main()
