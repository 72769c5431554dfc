#!/usr/bin/env python3
"""Held-out questions answered by llama.cpp from a GGUF file (e.g. one `peftkit merge --format gguf` wrote), checked
as `peftkit eval --questions` checks them: greedy, the file's chat template, at most 64 new tokens, a reply is right
when it contains an expected fact (case and runs of whitespace ignored). Prints one JSON line.

    $(../shared/scripts/llama-cpp.sh) scripts/llama-cpp-questions.py MERGED.gguf [datasets/sprigbox-support/eval_questions.jsonl]
"""
import json
import sys

from llama_cpp import Llama

model = sys.argv[1]
questions = sys.argv[2] if len(sys.argv) > 2 else "datasets/sprigbox-support/eval_questions.jsonl"
llm = Llama(model_path=model, n_threads=2, n_ctx=512, verbose=False)


def norm(s):
    return " ".join(s.split()).lower()


correct = total = 0
for line in open(questions):
    if not line.strip():
        continue
    q = json.loads(line)
    expected = q["expected"] if isinstance(q["expected"], list) else [q["expected"]]
    out = llm.create_chat_completion(messages=[{"role": "user", "content": q["question"]}], temperature=0,
                                     top_k=1, max_tokens=64)
    reply = out["choices"][0]["message"]["content"] or ""
    total += 1
    correct += any(norm(e) and norm(e) in norm(reply) for e in expected)
print(json.dumps({"system": "llama.cpp (llama-cpp-python)", "model": model, "questions": total, "correct": correct,
                  "accuracy": correct / max(total, 1)}))
