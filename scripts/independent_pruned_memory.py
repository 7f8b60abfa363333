"""A pruned memory's answers from plain transformers, independent of the emloc query path.

A cross-check for the fidelity numbers of pruned memories: the memory is the unpruned context built by
emloc, keeping per chunk and layer the tokens ``KVzipPress(ratio)`` keeps, with each chunk scored on
every earlier token (so its kept keys/values are exactly full ICL's), but the queries are answered here by ``AutoModelForCausalLM`` on the whole context's ``DynamicCache``, with an
attention function that hides, per layer and KV head, the context tokens the memory dropped. The
prompt and the label scoring are scripts/plain_icl.py's, as in scripts/independent_full_icl.py. Prints both harnesses' accuracy and how often they agree.

    python scripts/independent_pruned_memory.py --model smollm2-135m --task trec --ratio 0.19 --limit 300
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from plain_icl import PlainPrompt
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

from emloc_agents import EMLoCConfig, compress, load_model
from emloc_agents.bench.run import memory_labels
from emloc_agents.engine import CompressedMemory, Press
from emloc_agents.engine.presses import budget, topk_per_head
from emloc_agents.engine.reconstruct import keep_tokens, whole_context_scores
from emloc_agents.models.sources import resolve_model_dir
from emloc_agents.tasks import Task

KEEP: dict[int, torch.Tensor] = {}  # layer -> (kv_heads, memory tokens) bool; empty while prefilling
TAIL = [0]  # memory tokens re-fed with every query (the cache stops before them): they see everything


def masked_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal SDPA where context keys the memory dropped get no attention (per KV head)."""
    hq, hkv, q_len, k_len = query.shape[1], key.shape[1], query.shape[2], key.shape[2]
    allowed = torch.ones(hkv, q_len, k_len, dtype=torch.bool)
    allowed[:, :, k_len - q_len :] = torch.tril(torch.ones(q_len, q_len, dtype=torch.bool))
    keep = KEEP.get(module.layer_idx)
    if keep is not None:  # rows after the memory's tail see only what the memory kept
        allowed[:, TAIL[0] :, : keep.shape[1]] &= keep[:, None, :]
    group = hq // hkv
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(group, 1), value.repeat_interleave(group, 1),
        attn_mask=allowed.repeat_interleave(group, 0)[None], scale=scaling,
    )
    return out.transpose(1, 2).contiguous(), None


def chunk_scores(lm, skill) -> tuple[CompressedMemory, list[tuple[int, int, list[torch.Tensor]]]]:
    """The unpruned memory, and per chunk of the loop (offset, length, per layer KVzip's reconstruction
    scores (kv_heads, length)), each chunk scored on every earlier token (a press that keeps everything)."""
    chunks: list[tuple[int, int, list[torch.Tensor]]] = []

    class Record(Press):
        needs_reconstruction = True

        def select(self, ctx):
            chunks.append((ctx.offset, ctx.n, ctx.reconstruction_scores))
            return [None] * ctx.facts.num_layers

    full = compress(lm, skill, EMLoCConfig(), press=Record())
    return full, chunks


def global_scores(chunks: list[tuple[int, int, list[torch.Tensor]]]) -> list[torch.Tensor]:
    """KVzip's reconstruction scores of every context token, per layer (kv_heads, tokens)."""
    return [torch.cat([s[layer] for _, _, s in chunks], dim=-1) for layer in range(len(chunks[0][2]))]


def kvzip_per_chunk(lm, full: CompressedMemory, chunks: list[tuple[int, int, list[torch.Tensor]]],
                    ratio: float) -> CompressedMemory:
    """``full`` keeping, per chunk and full-attention layer, the tokens ``KVzipPress(ratio)`` keeps in
    each head (the press's selection, on the unpruned context's keys)."""
    f = lm.facts
    kept = {i: torch.cat([offset + topk_per_head(s[i], budget(n, ratio, 0)) for offset, n, s in chunks], dim=-1)
            for i in range(f.num_layers) if not f.sliding[i]}
    return keep_tokens(full, kept)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="trec")
    ap.add_argument("--shots", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--ratio", type=float, default=0.19, help="KVzip keep ratio of the memory under test")
    ap.add_argument("--global-heads", action="store_true",
                    help="instead of the memory's own selection, keep the top --ratio of KVzip's scores ranked "
                         "across all layers and heads together, plus 4 sink tokens (kvpress's KVzipPress); "
                         "a memory cannot hold per-head lengths, so only the transformers harness answers")
    ap.add_argument("--scores", choices=["chunks", "whole"], default="chunks",
                    help="with --global-heads: KVzip's scores per compression chunk, or over the whole context "
                         "in 2048-token spans (kvpress)")
    args = ap.parse_args()

    task = Task.load(args.task)
    skill = task.skill(shots=args.shots, seed=args.seed)
    lm = load_model(args.model)
    full, chunks = chunk_scores(lm, skill)
    mem = kvzip_per_chunk(lm, full, chunks, args.ratio)
    items = task.test[: args.limit]
    if args.global_heads:  # the memory's selection is replaced below: nothing of ours to compare
        ours: list[str | None] = [None] * len(items)
    else:
        ours = memory_labels(lm, task, mem, items)

    AttentionInterface.register("emloc_check_masked_sdpa", masked_sdpa)
    path = resolve_model_dir(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation="emloc_check_masked_sdpa").eval()
    prompt = PlainPrompt.for_task(AutoTokenizer.from_pretrained(path), task, args.shots, args.seed)
    n_prefix = len(prompt.prefix)
    renderer = lm.renderer("auto")
    memory_ids = renderer.render(skill.instruction, skill.demonstrations).ids
    assert len(memory_ids) == mem.original_length and memory_ids[:n_prefix] == prompt.prefix
    TAIL[0] = mem.original_length - n_prefix
    cache = prompt.prefill(model)
    for layer, pos in enumerate(mem.positions):
        KEEP[layer] = torch.zeros(pos.shape[0], mem.original_length, dtype=torch.bool).scatter_(1, pos.long(), True)
    if args.global_heads:
        if args.scores == "whole":
            unpruned = compress(lm, skill, EMLoCConfig(keep_ratios=(1.0,), storage_dtype="float32"))
            scores = torch.stack(whole_context_scores(lm, unpruned, memory_ids, encode=renderer.ids))
        else:
            scores = torch.stack(global_scores(chunks))  # (layers, kv_heads, tokens)
        scores[..., :4] = float("inf")
        top = torch.topk(scores.flatten(), round(args.ratio * scores.numel())).indices
        keep = torch.zeros(scores.numel(), dtype=torch.bool).scatter_(0, top, True).view(scores.shape)
        KEEP.update(enumerate(keep))

    def same_memory_tokens(full: list[int]) -> None:
        assert full[: mem.original_length] == memory_ids, "the memory's tokens are not the whole text's"

    t0 = time.perf_counter()
    theirs = [prompt.predict(model, cache, task.format_input(ex.text), task.labels, same_memory_tokens) for ex in items]
    labels = [ex.label for ex in items]

    def share(a: list, b: list) -> float | None:
        if args.global_heads and (a is ours or b is ours):
            return None
        return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)

    result = {
        "model": args.model, "task": args.task, "shots": args.shots, "seed": args.seed, "n": len(items),
        "selection": "global over layers and heads" if args.global_heads else "the memory's",
        "kept_ratio": float(torch.stack(list(KEEP.values())).float().mean()), "accuracy_emloc_query_path": share(ours, labels),
        "accuracy_transformers": share(theirs, labels), "same_prediction": share(ours, theirs),
        "seconds": time.perf_counter() - t0,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
