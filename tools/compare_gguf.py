#!/usr/bin/env python3
"""Whether two GGUF files hold the same model byte for byte: every tensor's type, shape and
bytes, and every metadata key's value (the order of tensors in the file aside). Reads them
with the `gguf` package (PyPI), the reader llama.cpp's own Python tools use.

    python3 tools/compare_gguf.py ours.gguf theirs.gguf [--json OUT]

Prints one line: how many tensors and keys differ (exit status 1 if any do).
"""
import argparse
import json
import sys

import gguf
import numpy as np


def tensors(reader):
    return {
        t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape), np.asarray(t.data).view(np.uint8).tobytes())
        for t in reader.tensors
    }


def fields(reader):
    return {k: [bytes(p) for p in f.parts] for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ours")
    ap.add_argument("theirs")
    ap.add_argument("--json")
    a = ap.parse_args()
    ours, theirs = gguf.GGUFReader(a.ours), gguf.GGUFReader(a.theirs)
    t_ours, t_theirs = tensors(ours), tensors(theirs)
    differ = sorted(
        n for n in set(t_ours) | set(t_theirs) if t_ours.get(n) != t_theirs.get(n)
    )
    types = {}
    for name, (kind, _, _) in t_theirs.items():
        types[kind] = types.get(kind, 0) + 1
    f_ours, f_theirs = fields(ours), fields(theirs)
    keys = sorted(k for k in set(f_ours) | set(f_theirs) if f_ours.get(k) != f_theirs.get(k))
    report = {
        "ours": a.ours,
        "theirs": a.theirs,
        "tensors": len(t_theirs),
        "tensor_types": types,
        "tensors_differing": differ,
        "keys": len(f_theirs),
        "keys_differing": keys,
    }
    if a.json:
        json.dump(report, open(a.json, "w"), indent=1)
    print(
        f"{a.ours} against {a.theirs}: {len(differ)} of {len(t_theirs)} tensors differ "
        f"({', '.join(f'{n} {k}' for k, n in sorted(types.items()))}), "
        f"{len(keys)} of {len(f_theirs)} metadata keys differ"
        + (f": {differ[:3] + keys[:3]}" if differ or keys else "")
    )
    sys.exit(1 if differ or keys else 0)


if __name__ == "__main__":
    main()
