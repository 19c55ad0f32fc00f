"""Chat prompts as transformers renders and tokenizes them, for
`crates/skipgpt-model/tests/it/chat_templates.rs`: four families' templates (SmolLM2's and
Qwen2's ChatML, Llama-3's header tokens, Mistral's [INST]), each applied to conversations with
`apply_chat_template(..., add_generation_prompt=True)`, as text and as token ids of the tiny
fixture's tokenizer (the template's text is what differs between families; the tokenizer call,
`add_special_tokens=False`, is the same for all).

    python tools/make_chat_template_fixture.py tests/fixtures/chat-templates   # needs transformers

The templates are the ones the models' `tokenizer_config.json` files ship (SmolLM2-135M-Instruct,
Qwen2-7B-Instruct, Meta-Llama-3-8B-Instruct, Mistral-7B-Instruct-v0.2).
"""
import json
import sys
from pathlib import Path

import transformers
from tokenizers import AddedToken, Tokenizer
from transformers import PreTrainedTokenizerFast

TEMPLATES = {
    "smollm2": {
        "bos": "<|im_start|>",
        "eos": "<|im_end|>",
        "template": "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    },
    "qwen2": {
        "bos": "",
        "eos": "<|im_end|>",
        "template": "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    },
    "llama3": {
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "template": "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    },
    "mistral": {
        "bos": "<s>",
        "eos": "</s>",
        "template": "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}",
    },
}

CONVERSATIONS = [
    [{"role": "user", "content": "How do I sort a list of numbers in Python?"}],
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "  Name three colours.  "},
    ],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Tell me a joke\nabout robots."},
    ],
]

SPECIAL = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>"]

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
tiny = Path(__file__).resolve().parent.parent / "tests/fixtures/llama-tiny/model/tokenizer.json"
base = Tokenizer.from_file(str(tiny))
base.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
base.save(str(out / "tokenizer.json"))
cases = []
for name, t in TEMPLATES.items():
    tok = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"), bos_token=t["bos"] or None,
                                  eos_token=t["eos"])
    tok.chat_template = t["template"]
    for messages in CONVERSATIONS:
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            error = None
        except Exception as e:  # the template's own raise_exception
            text, ids, error = None, None, str(e)
        cases.append({"family": name, "messages": messages, "text": text, "ids": ids, "error": error})
(out / "templates.json").write_text(json.dumps(TEMPLATES, indent=1, ensure_ascii=False) + "\n")
(out / "cases.json").write_text(json.dumps(
    {"transformers": transformers.__version__, "cases": cases}, indent=1, ensure_ascii=False) + "\n")
print(f"{len(cases)} cases, transformers {transformers.__version__}")
