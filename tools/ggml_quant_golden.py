#!/usr/bin/env python3
"""Writes the bytes llama.cpp's own reference quantizers (`quantize_row_*_ref` in
libggml-base, the functions `llama-quantize` calls without an importance matrix) make of a
fixed 1280-value input, one file per format, for skipgpt-kernels' tests to compare
`quant::quantize` with byte for byte.

    python3 tools/ggml_quant_golden.py ~/.cache/llama.cpp/bin/libggml-base.so \
        crates/skipgpt-kernels/tests/fixtures/ggml_quant

The input is `golden_input()`, written again in `crates/skipgpt-kernels/src/quant/tests.rs`:
every value a small integer over a power of two, so both languages build the same floats.
"""
import ctypes
import sys
from pathlib import Path

# format: (function, values per block, bytes per block)
FORMATS = {
    "q8_0": ("quantize_row_q8_0_ref", 32, 34),
    "q4_0": ("quantize_row_q4_0_ref", 32, 18),
    "q4_1": ("quantize_row_q4_1_ref", 32, 20),
    "q5_0": ("quantize_row_q5_0_ref", 32, 22),
    "q5_1": ("quantize_row_q5_1_ref", 32, 24),
    "q4_k": ("quantize_row_q4_K_ref", 256, 144),
    "q5_k": ("quantize_row_q5_K_ref", 256, 176),
    "q6_k": ("quantize_row_q6_K_ref", 256, 210),
}


def pseudo(i):
    """A value in [-1, 1) from a multiplicative hash of `i`, in steps of 1/2048."""
    return (((i * 2654435761) % 2**32 >> 20) - 2048) / 2048.0


def golden_input():
    """21 256-value blocks: mixed sub-block scales; all positive; a zero sub-block and an
    outlier; all zero; two constant halves; then 16 blocks whose scale changes every 16."""
    x = [pseudo(i) * 2.0 ** (i // 32 % 4 - 2) for i in range(256)]
    x += [abs(pseudo(i)) + 0.25 for i in range(256, 512)]
    third = [0.0] * 32 + [pseudo(i) for i in range(544, 768)]
    third[40] = 8.0
    x += third
    x += [0.0] * 256
    x += [0.5] * 128 + [-0.25] * 128
    x += [pseudo(i) * 2.0 ** (i // 16 % 5 - 2) for i in range(1280, 1280 + 16 * 256)]
    return x


def main():
    lib = ctypes.CDLL(sys.argv[1])
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    x = golden_input()
    values = (ctypes.c_float * len(x))(*x)
    for name, (function, per_block, block_bytes) in FORMATS.items():
        blocks = (ctypes.c_uint8 * (len(x) // per_block * block_bytes))()
        quantize = getattr(lib, function)
        quantize.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        quantize(values, blocks, len(x))
        (out / f"{name}.bin").write_bytes(bytes(blocks))
        print(name, len(blocks), "bytes")


if __name__ == "__main__":
    main()
