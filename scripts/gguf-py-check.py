#!/usr/bin/env python3
"""Checks peftkit's GGUF files with llama.cpp's own Python package, gguf-py (`pip install gguf`).

Usage: gguf-py-check.py REFERENCE_F32.gguf QUANTIZED.gguf [QUANTIZED.gguf ...]

REFERENCE_F32.gguf is `peftkit merge ... --format gguf --quant f32` of the same merge. For every tensor of each
QUANTIZED file, gguf-py's reader (GGUFReader) must parse the file, and then:
- where gguf-py can quantize the type (F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: what convert_hf_to_gguf.py writes
  with --outtype), gguf-py's quantization of the f32 tensor must equal peftkit's bytes exactly;
- otherwise (the k-quants, which only llama-quantize writes), gguf-py's dequantization of peftkit's bytes is compared
  with the f32 tensor (relative Frobenius error, printed; Gaussian weights give about 7.7e-2 for Q4_K, 3.9e-2 for
  Q5_K, 1.8e-2 for Q6_K).
Exit status 1 if any byte comparison fails.
"""
import sys

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, quants


def tensors(path):
    return {t.name: t for t in GGUFReader(path).tensors}


def main(reference, *files):
    ref = tensors(reference)
    failed = False
    for path in files:
        same, notes = 0, []
        for name, t in tensors(path).items():
            w = np.array(ref[name].data, dtype=np.float32).reshape([int(x) for x in reversed(ref[name].shape)])
            ty = GGMLQuantizationType(t.tensor_type)
            ours = np.array(t.data).tobytes()
            try:
                theirs = quants.quantize(w, ty).tobytes()
            except NotImplementedError:
                deq = quants.dequantize(np.array(t.data), ty).reshape(w.shape)
                err = np.linalg.norm(deq - w) / np.linalg.norm(w)
                notes.append(f"{name} {ty.name}: gguf-py dequantizes it to within {err:.3e} of the f32 tensor")
                continue
            if ours == theirs:
                same += 1
            else:
                failed = True
                a, b = np.frombuffer(ours, np.uint8), np.frombuffer(theirs, np.uint8)
                notes.append(f"{name} {ty.name}: DIFFERENT from gguf-py's quantization ({np.sum(a != b)} bytes)")
        print(f"{path}: {same} tensors byte-identical to gguf-py's quantization")
        for n in notes:
            print("   ", n)
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
