"""Test vectors for GGUF dequantization, from the reference implementation (`gguf.quants` in
the `gguf` PyPI package, which follows ggml-quants.c).

    pip install gguf numpy safetensors
    python tools/make_gguf_quant_fixture.py tests/fixtures/gguf-quants

For each type, `<TYPE>.bytes` (u8, the raw blocks) and `<TYPE>.values` (f32, what
`gguf.quants.dequantize` makes of them); `source`, the f32 values the quantized types were
made from (so that quantizers can be checked against gguf-py's too). Types gguf-py can quantize (F16, BF16, Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0) are quantized from normal samples; for the K-quants, which it only
dequantizes, the blocks are random bytes with their f16 scales set to finite values, so every
bit pattern of the packed scales and quants is exercised.
"""
import json, os, sys

import numpy as np
import gguf
from gguf import quants
from safetensors.numpy import save_file

out = sys.argv[1]
rng = np.random.default_rng(20261130)
Q = gguf.GGMLQuantizationType
tensors, meta = {}, {}
x = (rng.standard_normal((4, 512)) * 0.05).astype(np.float32)
x[0, :32] = 0.0  # an all-zero block (scale 0)
tensors["source"] = x.reshape(-1)  # what the quantized types were made from
for t in [Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]:
    raw = np.ascontiguousarray(quants.quantize(x, t)).view(np.uint8).reshape(-1)
    tensors[f"{t.name}.bytes"] = raw
    tensors[f"{t.name}.values"] = quants.dequantize(raw, t).reshape(-1).astype(np.float32)
    meta[t.name] = "quantized from N(0, 0.05) samples"

# K-quants: 6 super-blocks of random bytes; f16 fields (d, dmin) set to small finite values
layout = {Q.Q4_K: (144, [0, 2]), Q.Q5_K: (176, [0, 2]), Q.Q6_K: (210, [208])}
for t, (size, f16_at) in layout.items():
    blocks = rng.integers(0, 256, size=(6, size), dtype=np.uint8)
    for at in f16_at:
        scales = (rng.standard_normal(6) * 0.01).astype(np.float16)
        blocks[:, at:at + 2] = scales.view(np.uint8).reshape(6, 2)
    raw = blocks.reshape(-1)
    tensors[f"{t.name}.bytes"] = raw
    tensors[f"{t.name}.values"] = quants.dequantize(raw, t).reshape(-1).astype(np.float32)
    meta[t.name] = "random blocks, finite f16 scales"

os.makedirs(out, exist_ok=True)
save_file(tensors, os.path.join(out, "quants.safetensors"),
          metadata={"made_with": "gguf %s, numpy %s" % (__import__("importlib.metadata").metadata.version("gguf"), np.__version__),
                    "how": json.dumps(meta)})
print({k: v.shape for k, v in tensors.items()})
