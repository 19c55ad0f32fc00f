"""A PEFT LoRA adapter for tests/fixtures/llama-tiny/model, made by peft itself, and the
logits of the adapted model: the reference for `crates/skipgpt-model/tests/it/lora.rs` (peft_made_adapter_matches).

    python tools/make_peft_fixture.py tests/fixtures/peft-lora   # needs torch, transformers, peft

Every projection gets a rank-2 adapter with a scale of 3 (α 6); lora_B is drawn at random
(peft initialises it to zero, which would make the adapter invisible).
"""
import json
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

out = Path(sys.argv[1])
tiny = Path(__file__).resolve().parent.parent / "tests/fixtures/llama-tiny"
torch.manual_seed(20261125)
base = LlamaForCausalLM.from_pretrained(tiny / "model", torch_dtype=torch.float32)
cfg = LoraConfig(
    r=2,
    lora_alpha=6,
    lora_dropout=0.05,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    task_type="CAUSAL_LM",
)
model = get_peft_model(base, cfg)
for name, p in model.named_parameters():
    if "lora_B" in name:
        torch.nn.init.normal_(p, std=0.05)
model.save_pretrained(out)
model.eval()
ids = load_file(tiny / "reference.safetensors")["input_ids"]
with torch.no_grad():
    logits = model(input_ids=ids).logits.contiguous()
save_file({"input_ids": ids, "logits": logits}, out / "reference.safetensors")
(out / "README.md").write_text(
    "Made by tools/make_peft_fixture.py with peft "
    + __import__("peft").__version__
    + ": a LoRA adapter for ../llama-tiny/model and the adapted model's logits.\n"
)
print(json.dumps({"wrote": str(out), "logits": list(logits.shape)}))
