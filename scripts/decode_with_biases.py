"""Decoding per token on a merged memory (``merge_evicted=True``) with and without its logit biases: what
the float masks cost a decoding step (docs/benchmarks.md, "Decoding and time to first token"). SmolLM2, TREC-128, seed 0, 20 %.

    python scripts/decode_with_biases.py
"""

import dataclasses
import json
import statistics

import torch

from emloc_agents import EMLoCConfig, compress, load_model
from emloc_agents.engine.decode import generate
from emloc_agents.tasks import Task

torch.set_num_threads(1)
lm = load_model("smollm2-135m")
task = Task.load("trec")
skill = task.skill(shots=128, seed=0)
mem = compress(lm, skill, EMLoCConfig(keep_ratios=(0.2,), delta=1.0, merge_evicted=True))
plain = dataclasses.replace(mem, logit_bias=None)
prompt = lm.tokenizer(" What is the capital of France?\nType:", add_special_tokens=False)["input_ids"]
out = {"biased": [], "plain": []}
for _ in range(5):  # alternated, so both see the same machine load
    for name, m in (("biased", mem), ("plain", plain)):
        g = generate(lm, prompt, m, max_new_tokens=48, stop=())
        out[name].append(1e3 * g.decode_s / max(1, len(g.token_ids) - 1))
res = {k: statistics.median(v) for k, v in out.items()}
res["kept_ratio"] = mem.kept_ratio
print(json.dumps(res))
