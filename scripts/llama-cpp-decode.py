#!/usr/bin/env python3
"""llama.cpp's generation speed on a GGUF file, measured as `peftkit bench --generate` measures peftkit's: a prompt
of SEQ random tokens (prefill), then NEW greedy tokens one at a time with the KV cache, no stop token; best of ROUNDS
runs after a warm-up. Prints one JSON line. Run it with the python that ../shared/scripts/llama-cpp.sh prints:

    $(../shared/scripts/llama-cpp.sh) scripts/llama-cpp-decode.py MODEL.gguf [--seq 64] [--new 128] [--threads 2]

The same command line measures peftkit: `peftkit bench --generate --model MODEL.gguf --seq 64 --new-tokens 128`.
"""
import argparse
import json
import time

import numpy as np
import llama_cpp
from llama_cpp import Llama

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--seq", type=int, default=64)
p.add_argument("--new", type=int, default=128)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--rounds", type=int, default=3)
a = p.parse_args()

llm = Llama(model_path=a.model, n_threads=a.threads, n_threads_batch=a.threads, n_ctx=a.seq + a.new + 8,
            n_batch=max(a.seq, 8), verbose=False)
rng = np.random.default_rng(0)
n_vocab = llm.n_vocab()
prompt = [int(t) for t in rng.integers(0, llm.n_vocab(), a.seq)]
best_prefill = best_decode = 0.0
for run in range(a.rounds + 1):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for _ in range(a.new):
        # The last position's logits, as the C API hands them (the Python-side score table keeps only a batch).
        last = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        tok = int(np.argmax(last))
        llm.eval([tok])
    t2 = time.perf_counter()
    if run > 0:  # the first run warms up
        best_prefill = max(best_prefill, a.seq / (t1 - t0))
        best_decode = max(best_decode, a.new / (t2 - t1))
print(json.dumps({"system": "llama.cpp (llama-cpp-python)", "mode": "generate", "model": a.model,
                  "threads": a.threads, "prompt_tokens": a.seq, "new_tokens": a.new,
                  "prefill_tokens_per_s": best_prefill, "decode_tokens_per_s": best_decode}))
