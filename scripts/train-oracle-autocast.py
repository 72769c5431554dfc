#!/usr/bin/env python3
# usage: scripts/train-oracle-autocast.py tests/fixtures f32|bf16   (needs torch, transformers, peft, safetensors)
# Replays tests/fixtures/train-oracle with torch.autocast(bf16) to measure what bf16 mixed precision does to the
# same three AdamW steps in PEFT + torch (the outside yardstick for peftkit's bf16 tolerance).
import sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from peft import PeftModel
fx = sys.argv[1]
tr = load_file(f"{fx}/train-oracle/trajectory.safetensors")
base = AutoModelForCausalLM.from_pretrained(f"{fx}/tiny-llama", dtype=torch.float32)
model = PeftModel.from_pretrained(base, f"{fx}/train-oracle/init", is_trainable=True)
params = {n: p for n, p in model.named_parameters() if p.requires_grad}
init = {n: p.detach().clone() for n, p in params.items()}
opt = torch.optim.AdamW(list(params.values()), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
def key(n):  # parameter name -> PEFT file name
    return n.replace(".default", "")
for step in (1, 2, 3):
    ids, labels = tr[f"step{step}.input_ids"], tr[f"step{step}.labels"]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=(sys.argv[2] == "bf16")):
        loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(list(params.values()), 0.5)
    opt.step(); opt.zero_grad()
    num = den = 0.0; mx = 0.0
    for n, p in params.items():
        want = tr[f"step{step}.{key(n)}"]
        num += ((p.detach() - want) ** 2).sum().item(); den += ((want - init[n]) ** 2).sum().item()
        mx = max(mx, (p.detach() - want).abs().max().item())
    print(f"{sys.argv[2]} step {step}: loss {loss.item():.7f} grad norm {norm.item():.7f} max|Δ| {mx:.2e} update rel. error {(num/den)**0.5:.2e}")
