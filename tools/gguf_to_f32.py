"""Writes a GGUF with every tensor dequantized to F32 (same metadata, same tensor order), so
that llama.cpp runs the very weights `skipgpt import-gguf` gives the project.

    python tools/gguf_to_f32.py IN.gguf OUT.gguf

Needs the `gguf` package (gguf-py), whose `quants.dequantize` is llama.cpp's reference.
"""
import sys

import numpy as np
import gguf
from gguf import GGUFReader, GGUFWriter, GGUFValueType
from gguf.quants import dequantize

src, dst = sys.argv[1], sys.argv[2]
r = GGUFReader(src)
arch = r.fields["general.architecture"].contents()
w = GGUFWriter(dst, arch)
for name, field in r.fields.items():
    if name.startswith("GGUF.") or name in ("general.architecture", "general.alignment"):
        continue
    if name == "general.file_type":
        w.add_uint32(name, int(gguf.LlamaFileType.ALL_F32))
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
    w.add_tensor(t.name, data.reshape(tuple(int(d) for d in reversed(t.shape))), raw_dtype=gguf.GGMLQuantizationType.F32)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
print(f"wrote {dst}: {len(r.tensors)} tensors, F32")
