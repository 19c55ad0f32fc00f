"""Checks by hand that transformers loads a directory written by `skipgpt import-gguf` and
computes what it computed from the GGUF itself (the fixture of shared/tools/make_smollm2_fixture.py).

    skipgpt import-gguf SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/smollm2
    python tools/check_gguf_import.py /tmp/smollm2 tests/fixtures/smollm2

Needs torch, transformers and safetensors. Not part of the test suite: the project's tests
need no Python; this only confirms that the files are the HF layout transformers expects.
"""
import json, os, sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, fixture = sys.argv[1], sys.argv[2]
ref = load_file(os.path.join(fixture, "reference.safetensors"))
meta = json.load(open(os.path.join(fixture, "reference.json")))
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

bad = 0
for text, ids in meta["probes"].items():
    got = tok(text, add_special_tokens=False).input_ids
    if got != ids:
        bad += 1
        print(f"tokenizer differs on {text!r}: {got} vs {ids}")
for text, ids in zip(meta["texts"], meta["text_ids"]):
    if tok(text, add_special_tokens=False).input_ids != ids:
        bad += 1
        print(f"tokenizer differs on text {text[:40]!r}...")
with torch.no_grad():
    logits = model(ref["input_ids"]).logits
    logp = torch.log_softmax(logits.double(), -1)
    nll = -logp[:, :-1].gather(-1, ref["input_ids"][:, 1:, None])[..., 0]
    g = model.generate(ref["greedy_prompt"], max_new_tokens=24, min_new_tokens=24,
                       do_sample=False, pad_token_id=tok.pad_token_id)[:, 16:]
d_nll = (nll.float() - ref["nll"]).abs().max().item()
d_tail = (logits[:, -4:] - ref["logits_tail"]).abs().max().item()
argmax_equal = bool((logits.argmax(-1) == ref["argmax"]).all())
greedy_equal = bool((g == ref["greedy_tokens"]).all())
chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                               add_generation_prompt=True)
print(json.dumps({"max_abs_nll_diff": d_nll, "max_abs_logits_tail_diff": d_tail,
                  "argmax_equal": argmax_equal, "greedy_equal": greedy_equal,
                  "tokenizer_mismatches": bad, "chat_template": chat}, indent=1))
ok = d_nll < 1e-4 and d_tail < 2e-4 and argmax_equal and greedy_equal and bad == 0
sys.exit(0 if ok else 1)
