"""The official `openai` Python client against `skipgpt serve`: a chat completion, a streamed
one, a text completion, and the `skip` extension through `extra_body`. Run by
`tests/it/serve.rs` (the_official_openai_client_talks_to_the_server).

    python3 tools/openai_client_check.py http://127.0.0.1:PORT/v1 [--routed]

Prints one JSON line of what it saw; exits non-zero on any failure.
"""
import json
import sys

from openai import OpenAI

base, routed = sys.argv[1], "--routed" in sys.argv
client = OpenAI(base_url=base, api_key="unused")
messages = [{"role": "user", "content": "the end"}]

whole = client.chat.completions.create(
    model="tiny", messages=messages, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
)
assert whole.choices[0].finish_reason == "length", whole
assert whole.usage.completion_tokens == 8, whole.usage
text = whole.choices[0].message.content

pieces = []
for chunk in client.chat.completions.create(
    model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True,
    stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
):
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
    if chunk.usage is not None:
        assert chunk.usage.completion_tokens == 8, chunk.usage
assert "".join(pieces) == text, (pieces, text)

completion = client.completions.create(model="tiny", prompt="the end", max_tokens=4, temperature=0)
assert completion.choices[0].text is not None

seen = {"chat": text, "streamed_pieces": len(pieces)}
if routed:
    skips = {}
    for skip in (0.0, 0.5):
        r = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=16, temperature=0,
            extra_body={"skip": skip, "ignore_eos": True},
        )
        skips[skip] = r.usage.model_extra["skip"]["params"]
    assert skips[0.0] == 0.0 and skips[0.5] > 0.2, skips
    seen["skip"] = skips
print(json.dumps(seen))
