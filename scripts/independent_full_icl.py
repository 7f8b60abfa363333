"""Full-ICL accuracy from plain transformers, independent of the emloc engine.

A cross-check for ``emloc bench --methods full-icl-cached``: the same task, demonstrations and label
set, but the prompt is built by string concatenation here, tokenized once by the Hugging Face
tokenizer, and scored with ``AutoModelForCausalLM`` and a ``DynamicCache`` — no emloc renderer, cache
or decode code. Only the checkpoint (from ``emloc_agents.load_model``'s converted cache) and the task
sampling are shared.

    python scripts/independent_full_icl.py --model smollm2-135m --task trec --shots 128 --seed 0 --limit 300
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from plain_icl import PlainPrompt
from transformers import AutoModelForCausalLM, AutoTokenizer

from emloc_agents.models.sources import resolve_model_dir
from emloc_agents.tasks import Task


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="trec")
    ap.add_argument("--shots", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    path = resolve_model_dir(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    task = Task.load(args.task)
    prompt = PlainPrompt.for_task(tok, task, args.shots, args.seed)
    cache = prompt.prefill(model)
    n_prefix = len(prompt.prefix)

    items = task.test[: args.limit]
    preds, t0 = [], time.perf_counter()
    for k, ex in enumerate(items):
        if k % 50 == 0:
            print(f"{k}/{len(items)} items, {time.perf_counter() - t0:.0f} s", flush=True)
        preds.append(prompt.predict(model, cache, task.format_input(ex.text), task.labels))
    acc = sum(p == ex.label for p, ex in zip(preds, items, strict=True)) / len(items)
    result = {"model": args.model, "task": args.task, "shots": args.shots, "seed": args.seed, "n": len(items),
              "prompt_tokens": n_prefix + 1, "accuracy": acc, "seconds": time.perf_counter() - t0, "predictions": preds}
    print(json.dumps({k: v for k, v in result.items() if k != "predictions"}))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh)


if __name__ == "__main__":
    main()
