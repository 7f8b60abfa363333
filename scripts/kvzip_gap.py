"""Where chunk-wise KVzip loses against KVzip over the whole context (docs/design.md, "Variants
measured and dropped"): {whole-context, chunk-wise} reconstruction scores x {one ranking of the whole context, one
per chunk} allocation, all on the unpruned context's keys, at one share. Appends JSON lines to OUT.

    python scripts/kvzip_gap.py smollm2-135m trec 0 0.2 300 results/kvzip-gap.jsonl
"""

from __future__ import annotations

import json
import sys

import torch

from emloc_agents import EMLoCConfig, compress, load_model
from emloc_agents.bench.metrics import agreement
from emloc_agents.bench.presses import KVzipPress
from emloc_agents.bench.run import memory_labels
from emloc_agents.engine.presses import allocate, budget, padded_indices
from emloc_agents.engine.reconstruct import keep_tokens, kvzip_memory, whole_context_scores
from emloc_agents.tasks import Task


class Recorder(KVzipPress):
    """Keeps every token; records each chunk's reconstruction scores."""

    def select(self, ctx):
        self.log.append((ctx.offset, ctx.n, [s.clone() for s in ctx.reconstruction_scores]))
        return [None] * ctx.facts.num_layers


def masks_per_chunk(f, scores, ratio, spans, total):
    """Per full-attention layer the kept token indices when every chunk keeps its own share."""
    masks = {i: torch.zeros(f.num_kv_heads, total, dtype=torch.bool) for i in range(f.num_layers) if not f.sliding[i]}
    for off, n in spans:
        kept = allocate({i: scores[i][:, off : off + n] for i in masks}, budget(n, ratio, 0), True, True)
        for i, idx in kept.items():
            for h in range(idx.shape[0]):
                masks[i][h, off + idx[h][idx[h] >= 0]] = True
    return {i: padded_indices(m) for i, m in masks.items()}


def main() -> None:
    model, task_name, seed, ratio, limit, out_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
    lm = load_model(model)
    f = lm.facts
    task = Task.load(task_name)
    items = task.test[:limit]
    labels = [e.label for e in items]
    skill = task.skill(shots=128, seed=seed)
    rec = Recorder(sinks=4)
    rec.log = []
    full = compress(lm, skill, EMLoCConfig(keep_ratios=(1.0,), storage_dtype="float32"), press=rec)
    total = full.original_length
    chunk_scores = [torch.cat([s[i] for _, _, s in rec.log], dim=1) for i in range(f.num_layers)]
    for s in chunk_scores:
        s[:, :4] = float("inf")
    spans = [(o, n) for o, n, _ in rec.log]
    renderer = lm.renderer("auto")
    whole = whole_context_scores(lm, full, renderer.render(skill.instruction, skill.demonstrations).ids,
                                 encode=renderer.ids)
    ref = memory_labels(lm, task, full, items)
    for name, sc in [("whole", whole), ("chunk", chunk_scores)]:
        for alloc in ["global", "per-chunk"]:
            if alloc == "global":
                mem = kvzip_memory(lm, full, sc, ratio, layer_budgets=True, head_budgets=True)
            else:
                mem = keep_tokens(full, masks_per_chunk(f, sc, ratio, spans, total))
            preds = memory_labels(lm, task, mem, items)
            row = dict(model=model, task=task_name, seed=seed, scores=name, alloc=alloc, kept=mem.kept_ratio,
                       acc=sum(p == y for p, y in zip(preds, labels, strict=True)) / len(items),
                       full_acc=sum(p == y for p, y in zip(ref, labels, strict=True)) / len(items),
                       agree=agreement(preds, ref))
            print(row, flush=True)
            with open(out_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
