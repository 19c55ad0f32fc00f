"""Builds tiny HF-format LLaMA checkpoints and reference outputs with HF transformers.

Copied from shared/tools/make_fixtures.py and extended (skipgpt): more VARIANTS (llama3 RoPE,
tied embeddings, bf16, shards, dynamic RoPE, Qwen2 with linear RoPE), and the model seed is
retried until the dense greedy margin clears the tie threshold instead of asserting.
The files in tests/fixtures/variants/ were made with torch 2.15 and transformers 5.24, so their
config.json is in the transformers 5.x layout (`rope_parameters`, `dtype`).

Run with a Python that has torch, transformers, safetensors and tokenizers:
    python tools/make_fixtures.py OUT_DIR --corpus "DOCS/*.txt" --variant shared
Add an entry to VARIANTS to make another configuration.
"""
import argparse, glob, json, os, re

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM


def corpus_lines(pattern, limit_chars=3_000_000):
    text, n = [], 0
    for path in sorted(glob.glob(pattern)):
        for line in open(path, encoding="utf-8", errors="ignore"):
            line = line.strip()
            if len(line) > 20:
                text.append(line)
                n += len(line)
        if n > limit_chars:
            break
    return text


def build_tokenizer(vocab_size, pattern):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus_lines(pattern), trainer)
    return tok


VARIANTS = {
    # what the developers get: a LLaMA-2 style config
    "shared": dict(
        vocab=512, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=256,
        rope_scaling=None, dtype=torch.float32, shards=1, seed=7,
    ),
    # LLaMA 3.1 RoPE with a short original context so the rescaling acts at these lengths,
    # tied embeddings, bf16 weights in several shards; written in the 5.x config layout.
    "llama3_tied_bf16_sharded": dict(
        vocab=512, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=256,
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        dtype=torch.bfloat16, shards=3, seed=11,
    ),
    # dynamic NTK: max_position_embeddings below the test length so the base actually grows
    "dynamic_rope": dict(
        vocab=512, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=16,
        rope_scaling={"rope_type": "dynamic", "factor": 2.0},
        dtype=torch.float32, shards=1, seed=13,
    ),
    # Qwen2: bias on q, k, v; linear RoPE scaling; f16 weights
    "qwen2_linear_f16": dict(
        arch="qwen2", vocab=512, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=256,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
        dtype=torch.float16, shards=1, seed=17,
    ),
}


def routed_forward(model, input_ids, routers, mlp_router_input):
    """SkipGPT forward with deterministic gates (execute iff logit[0] > logit[1]).

    Every module is computed for every token and its output multiplied by the 0/1 gate,
    so a skipped token still lends its keys and values to the others (the reference semantics).
    """
    m = model.model
    x = m.embed_tokens(input_ids)
    pos = torch.arange(input_ids.shape[1]).unsqueeze(0).expand(input_ids.shape[0], -1)
    pe = m.rotary_emb(x, pos)
    s = input_ids.shape[1]
    mask = torch.full((s, s), float("-inf")).triu(1)[None, None]
    gates_a, gates_m, margins = [], [], []
    for i, layer in enumerate(m.layers):
        ra = x.float() @ routers[i]["attn_w"].T + routers[i]["attn_b"]
        ga = (ra[..., 0] > ra[..., 1]).to(x.dtype)
        attn = layer.self_attn(layer.input_layernorm(x), attention_mask=mask.to(x.dtype),
                               position_embeddings=pe, position_ids=pos)[0]
        h = x + ga[..., None] * attn
        rin = x if mlp_router_input == "block_input" else h
        rm = rin.float() @ routers[i]["mlp_w"].T + routers[i]["mlp_b"]
        gm = (rm[..., 0] > rm[..., 1]).to(x.dtype)
        x = h + gm[..., None] * layer.mlp(layer.post_attention_layernorm(h))
        gates_a.append(ga)
        gates_m.append(gm)
        margins += [(ra[..., 0] - ra[..., 1]).abs().min(), (rm[..., 0] - rm[..., 1]).abs().min()]
    logits = model.lm_head(m.norm(x))
    return logits, torch.stack(gates_a), torch.stack(gates_m), min(margins)


def greedy(fn, prompt, steps):
    ids = prompt.clone()
    margins = []
    for _ in range(steps):
        logits = fn(ids)[:, -1]
        top = logits.float().topk(2, dim=-1).values
        margins.append((top[:, 0] - top[:, 1]).min())
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompt.shape[1]:], min(margins)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--corpus", required=True, help="glob of plain-text files to train the tokenizer on")
    ap.add_argument("--variant", choices=VARIANTS, default="shared")
    a = ap.parse_args()
    v = VARIANTS[a.variant]
    torch.manual_seed(v["seed"])
    os.makedirs(a.out, exist_ok=True)
    ckpt = os.path.join(a.out, "model")
    os.makedirs(ckpt, exist_ok=True)

    tok = build_tokenizer(v["vocab"], a.corpus)
    tok.save(os.path.join(ckpt, "tokenizer.json"))
    vocab = tok.get_vocab_size()

    qwen = v.get("arch") == "qwen2"
    Config, Model = (Qwen2Config, Qwen2ForCausalLM) if qwen else (LlamaConfig, LlamaForCausalLM)
    extra = {"use_sliding_window": False} if qwen else {}
    rope = dict(v["rope_scaling"] or {"rope_type": "default"}, rope_theta=v["rope_theta"])
    cfg = Config(
        vocab_size=vocab, hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
        num_hidden_layers=v["num_hidden_layers"], num_attention_heads=v["num_attention_heads"],
        num_key_value_heads=v["num_key_value_heads"], rope_parameters=rope,
        rms_norm_eps=v["rms_norm_eps"], tie_word_embeddings=v["tie_word_embeddings"],
        max_position_embeddings=v["max_position_embeddings"],
        initializer_range=0.08, bos_token_id=0, eos_token_id=1, hidden_act="silu", **extra,
    )
    texts = [
        "The quick brown fox jumps over the lazy dog while the editor saves the buffer.",
        "Use :help to read about a command; the cursor moves to the next word with w.",
    ]
    enc = [tok.encode(t).ids for t in texts]
    S = min(24, *(len(e) for e in enc))
    ids = torch.tensor([e[:S] for e in enc], dtype=torch.long)
    prompt = ids[:, :8]
    tie = 2e-3
    # retry the init seed until no greedy step is a near-tie (fragile to test against)
    for attempt in range(100):
        torch.manual_seed(v["seed"] + 1000 * attempt)
        model = Model(cfg).eval().to(v["dtype"])
        with torch.no_grad():
            ref_model = Model(cfg).eval()
            ref_model.load_state_dict({k: t.float() for k, t in model.state_dict().items()})
            gen, margin = greedy(lambda x: ref_model(x).logits, prompt, 16)
            # an EOS in the continuation would be suppressed by generate(min_new_tokens=16)
            if margin > tie and not (gen == cfg.eos_token_id).any():
                break
    # routers: Linear(d, 2) per module, index 0 = execute, index 1 = skip
    d, L = v["hidden_size"], v["num_hidden_layers"]
    def draw_routers(seed):
        g = torch.Generator().manual_seed(seed)
        return [{k: torch.randn(*shape, generator=g) * scale for k, shape, scale in [
            ("attn_w", (2, d), 1.0), ("attn_b", (2,), 0.5), ("mlp_w", (2, d), 1.0), ("mlp_b", (2,), 0.5)]}
            for _ in range(L)]

    model.save_pretrained(ckpt, safe_serialization=True,
                          max_shard_size="1GB" if v["shards"] == 1 else "120KB")
    # the same weights with routers added, as a SkipGPT checkpoint
    routed = os.path.join(a.out, "model-routed")
    model.save_pretrained(routed, safe_serialization=True)
    tok.save(os.path.join(routed, "tokenizer.json"))
    # references are computed in float32 from the stored weights (bf16 to f32 is exact)
    model = ref_model
    seed = v["seed"] + 1
    while True:
        routers = draw_routers(seed)
        with torch.no_grad():
            ok = all(routed_forward(model, ids, routers, m)[3] > tie for m in ["post_attn", "block_input"])
            ok = ok and all(greedy(lambda x: routed_forward(model, x, routers, m)[0], prompt, 16)[1] > tie
                            for m in ["post_attn", "block_input"])
        if ok:
            break
        seed += 1
    rt = {}
    for i, r in enumerate(routers):
        rt[f"model.layers.{i}.attn_router.weight"] = r["attn_w"].contiguous()
        rt[f"model.layers.{i}.attn_router.bias"] = r["attn_b"].contiguous()
        rt[f"model.layers.{i}.mlp_router.weight"] = r["mlp_w"].contiguous()
        rt[f"model.layers.{i}.mlp_router.bias"] = r["mlp_b"].contiguous()
    save_file(rt, os.path.join(routed, "routers.safetensors"))

    ref = {"input_ids": ids}
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        ref["logits"] = out.logits.float()
        for k, hs in enumerate(out.hidden_states):
            ref[f"hidden_states.{k}"] = hs.float()
        gen, gm = greedy(lambda x: model(x).logits, prompt, 16)
        assert gm > tie, f"dense greedy margin {gm}: change the seed"
        ref["greedy_prompt"], ref["greedy_tokens"] = prompt, gen
        hf_gen = model.generate(prompt, max_new_tokens=16, do_sample=False, min_new_tokens=16,
                                pad_token_id=1)[:, 8:]
        # dynamic NTK rescales keys already in the cache, so there cached and recomputed may differ
        if not (v["rope_scaling"] or {}).get("rope_type") == "dynamic":
            assert torch.equal(hf_gen, gen), "HF generate (with its KV cache) disagrees with recompute"
        margins = {"greedy_dense": float(gm)}
        for mode in ["post_attn", "block_input"]:
            lg, ga, gmk, mm = routed_forward(model, ids, routers, mode)
            ref[f"routed.{mode}.logits"] = lg.float()
            ref[f"routed.{mode}.attn_gates"] = ga.float()
            ref[f"routed.{mode}.mlp_gates"] = gmk.float()
            gen, gmr = greedy(lambda x: routed_forward(model, x, routers, mode)[0], prompt, 16)
            ref[f"routed.{mode}.greedy_tokens"] = gen
            margins[f"router_{mode}"] = float(mm)
            margins[f"greedy_{mode}"] = float(gmr)
        # the dense check: with every gate forced open the routed path equals the dense model
        ones = [{"attn_w": torch.zeros(2, d), "attn_b": torch.tensor([1.0, 0.0]),
                 "mlp_w": torch.zeros(2, d), "mlp_b": torch.tensor([1.0, 0.0])} for _ in range(L)]
        lg, *_ = routed_forward(model, ids, ones, "post_attn")
        dense_gap = (lg.float() - ref["logits"]).abs().max().item()
        assert dense_gap < 1e-2, dense_gap
    ref = {k: t.contiguous() for k, t in ref.items()}
    save_file(ref, os.path.join(a.out, "reference.safetensors"))
    skip = {m: {"attn": 1 - ref[f"routed.{m}.attn_gates"].mean().item(),
                "mlp": 1 - ref[f"routed.{m}.mlp_gates"].mean().item()} for m in ["post_attn", "block_input"]}
    meta = {"texts": texts, "router_seed": seed, "dtype": str(v["dtype"]), "margins": margins, "skip_fraction": skip,
            "params": sum(p.numel() for p in model.parameters()), "variant": a.variant,
            "transformers": __import__("transformers").__version__}
    json.dump(meta, open(os.path.join(a.out, "reference.json"), "w"), indent=2)
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
