#!/usr/bin/env python3
"""Rewrites a safetensors file with every F32 tensor stored as F16 (standard library only).

    python3 tools/safetensors_to_f16.py IN OUT

Used to publish LoRA adapters at half the size (`cargo xtask experiment --real`): the
adapters' values are small and well inside f16's range. Refuses a value f16 cannot hold.
"""
import json
import struct
import sys
from array import array


def main(src: str, dst: str) -> None:
    with open(src, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    out_header, chunks, offset = {}, [], 0
    for name, info in header.items():
        if name == "__metadata__":
            out_header[name] = info
            continue
        start, end = info["data_offsets"]
        raw = body[start:end]
        if info["dtype"] == "F32":
            values = array("f")
            values.frombytes(raw)
            if sys.byteorder != "little":
                values.byteswap()
            try:
                raw = struct.pack(f"<{len(values)}e", *values)
            except OverflowError:
                sys.exit(f"{src}: tensor {name} has a value outside the f16 range")
            info = dict(info, dtype="F16")
        out_header[name] = dict(info, data_offsets=[offset, offset + len(raw)])
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(out_header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(dst + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(chunks))
    import os

    os.replace(dst + ".tmp", dst)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
