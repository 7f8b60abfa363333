"""Decoding on a memory under grouped-query attention: ms per token with a decoding step's query
heads as rows of their KV head (the engine's ``runtime._decoding_step``) against transformers' SDPA path (keys
left to ``enable_gqa`` without a mask, repeated per query head with one), on a random-weight model of
a real shape. Decoding speed does not depend on what the memory holds, so the memories are random
keys and values of the given lengths; both paths run in one process, alternating, on one thread.
``--dtypes float32,bfloat16`` times the model and memory in each dtype the same way (CPUs with native
bfloat16 read half the weight bytes per token).

    python scripts/decode_gqa.py --shape qwen2-0.5b --lengths 1400,14000 --out results/decode-gqa.json
    python scripts/decode_gqa.py --dtypes float32,bfloat16 --paths packed --out results/decode-dtypes.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from emloc_agents.bench.gpu import default_tokenizer, random_model
from emloc_agents.bench.run import machine_info
from emloc_agents.bench.scaling import code_state
from emloc_agents.bench.timing import engine_decode_per_token
from emloc_agents.engine import runtime
from emloc_agents.engine.memory import CompressedMemory


def transformers_step(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                      scaling: float | None) -> torch.Tensor:
    """The decoding step as the engine ran it before: transformers' SDPA with the mask widened to the
    query heads."""
    module = torch.nn.Module()
    module.num_key_value_groups = query.shape[1] // key.shape[1]  # type: ignore[assignment]
    if mask is not None and mask.shape[1] not in (1, query.shape[1]):
        mask = mask.repeat_interleave(query.shape[1] // mask.shape[1], dim=1)
    if mask is not None and mask.is_floating_point():
        mask = mask.to(query.dtype)
    return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, is_causal=False)[0]


def random_memory(lm: Any, n: int) -> CompressedMemory:
    f = lm.facts
    g = torch.Generator().manual_seed(0)
    shape = (f.num_kv_heads, n, f.head_dim)
    return CompressedMemory(
        keys=[torch.randn(shape, generator=g) for _ in range(f.num_layers)],
        values=[torch.randn(shape, generator=g) for _ in range(f.num_layers)],
        positions=[torch.arange(n).expand(f.num_kv_heads, n).contiguous() for _ in range(f.num_layers)],
        original_length=n, sliding=list(f.sliding))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2-0.5b")
    ap.add_argument("--lengths", default="1400,14000")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtypes", default="float32", help="the model's and the memory's dtypes (a comma list)")
    ap.add_argument("--paths", default="packed,transformers", help="which decoding steps to time")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dtypes = args.dtypes.split(",")
    models = {dt: random_model(args.shape, default_tokenizer(None), torch.device("cpu"), getattr(torch, dt))
              for dt in dtypes}
    query = models[dtypes[0]].tokenizer(" What is the capital of France?\nType:", add_special_tokens=False)["input_ids"]
    packed = runtime._decoding_step
    paths = {"packed": packed, "transformers": transformers_step}
    rows: dict[str, dict[str, list[float]]] = {}
    for n in (int(x) for x in args.lengths.split(",")):
        memories = {dt: random_memory(models[dt], n).to(dtype=getattr(torch, dt)) for dt in dtypes}
        for _ in range(args.rounds):  # every dtype and path once a round: they share the machine's load
            for dt in dtypes:
                for name in args.paths.split(","):
                    runtime._decoding_step = paths[name]  # type: ignore[assignment]
                    try:
                        ms = 1e3 * engine_decode_per_token(models[dt], query, memories[dt], repeats=2, tokens=16)
                    finally:
                        runtime._decoding_step = packed  # type: ignore[assignment]
                    key = name if len(dtypes) == 1 else f"{dt}/{name}"
                    rows.setdefault(str(n), {}).setdefault(key, []).append(ms)
                    print(n, key, round(ms, 1), flush=True)
    best = {n: {k: min(v) for k, v in r.items()} for n, r in rows.items()}
    lengths = sorted(best, key=int)
    result = {"machine": machine_info(), "code": code_state(), "shape": args.shape, "dtypes": dtypes,
              "threads": 1, "ms_per_token": rows, "best_ms_per_token": best,
              "longest_over_shortest": {k: best[lengths[-1]][k] / best[lengths[0]][k] for k in best[lengths[0]]}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(best))


if __name__ == "__main__":
    main()
