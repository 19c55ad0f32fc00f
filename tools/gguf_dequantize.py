"""Writes a GGUF with every tensor dequantized to F32 (same metadata, same tensor order), so
that llama.cpp runs the very weights `skipgpt import-gguf` gives the project. With `f16`, the
matrices are then rounded to F16 (norms stay F32, as llama.cpp's own F16 conversions keep them):
the weights `skipgpt --dtype f16` holds.

    python tools/gguf_dequantize.py IN.gguf OUT.gguf [f32|f16]

Needs the `gguf` package (gguf-py), whose `quants.dequantize` is llama.cpp's reference.
"""
import sys

import numpy as np
import gguf
from gguf import GGUFReader, GGUFWriter, GGUFValueType
from gguf.quants import dequantize

src, dst = sys.argv[1], sys.argv[2]
kind = sys.argv[3] if len(sys.argv) > 3 else "f32"
if kind not in ("f32", "f16"):
    sys.exit(f"type must be f32 or f16, got {kind!r}")
r = GGUFReader(src)
arch = r.fields["general.architecture"].contents()
w = GGUFWriter(dst, arch)
for name, field in r.fields.items():
    if name.startswith("GGUF.") or name in ("general.architecture", "general.alignment"):
        continue
    if name == "general.file_type":
        ftype = gguf.LlamaFileType.ALL_F32 if kind == "f32" else gguf.LlamaFileType.MOSTLY_F16
        w.add_uint32(name, int(ftype))
        continue
    vtype = field.types[0]
    value = field.contents()
    if vtype == GGUFValueType.ARRAY:
        w.add_key_value(name, value, vtype, sub_type=field.types[-1])
    else:
        w.add_key_value(name, value, vtype)
for t in r.tensors:
    data = dequantize(t.data, t.tensor_type).astype(np.float32)
    # GGUF dims are fastest-first; numpy wants the reverse
    data = data.reshape(tuple(int(d) for d in reversed(t.shape)))
    if kind == "f16" and data.ndim == 2:
        w.add_tensor(t.name, data.astype(np.float16), raw_dtype=gguf.GGMLQuantizationType.F16)
    else:
        w.add_tensor(t.name, data, raw_dtype=gguf.GGMLQuantizationType.F32)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
print(f"wrote {dst}: {len(r.tensors)} tensors, {kind.upper()}")
