"""KVzip as shipped by NVIDIA kvpress (0.5.5, ``KVzipPress``) on natural-text ICL: the off-the-shelf
baseline the memory is measured against (docs/benchmarks.md, "The chunk-wise loop"), scored like scripts/independent_full_icl.py
(the same prompt text and label log-likelihood, scripts/plain_icl.py).

kvpress is not a dependency of this package. To run it here:

    pip install --no-deps --target /tmp/kvpkg kvpress==0.5.5 cachetools datasets fire
    rm -rf /tmp/kvpkg/numpy* /tmp/kvpkg/huggingface_hub*     # keep the venv's versions
    # transformers 5.24 passes the cache as ``cache=``; kvpress 0.5.5 reads ``past_key_values``:
    sed -i 's/self._cache = kwargs\\["past_key_values"\\]/self._cache = kwargs.get("past_key_values") or kwargs.get("cache")/' \
        /tmp/kvpkg/kvpress/presses/kvzip_press.py
    PYTHONPATH=/tmp/kvpkg python scripts/kvpress_reference.py --model smollm2-135m --task trec --keep 0.2 --out r.json

The model's chat template is hidden from KVzipPress (as for a base model), so it scores every token of
the plain-text context instead of skipping a chat-template prefix the text does not have.
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
    import kvpress.presses.kvzip_press as kvzip_module
    from kvpress import KVzipPress

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="trec")
    ap.add_argument("--shots", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--keep", type=float, default=0.2, help="share of the context's KV pairs kept")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    path = resolve_model_dir(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    from_pretrained = kvzip_module.AutoTokenizer.from_pretrained

    def without_template(*a, **k):
        t = from_pretrained(*a, **k)
        t.chat_template = None
        return t

    kvzip_module.AutoTokenizer.from_pretrained = without_template
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    task = Task.load(args.task)
    prompt = PlainPrompt.for_task(tok, task, args.shots, args.seed)
    t0 = time.perf_counter()
    with KVzipPress(compression_ratio=1 - args.keep)(model):
        cache = prompt.prefill(model)
    compress_s = time.perf_counter() - t0
    masked = [getattr(layer.self_attn, "masked_key_indices", None) for layer in model.model.layers]
    pairs = len(masked) * model.config.num_key_value_heads * len(prompt.prefix)
    kept = 1 - sum(0 if m is None else len(m[0]) for m in masked) / pairs

    items = task.test[: args.limit]
    preds = [prompt.predict(model, cache, task.format_input(ex.text), task.labels) for ex in items]
    result = {
        "model": args.model, "task": args.task, "shots": args.shots, "seed": args.seed, "n": len(items),
        "press": "kvpress 0.5.5 KVzipPress", "kept": kept, "compress_s": compress_s,
        "accuracy": sum(p == ex.label for p, ex in zip(preds, items, strict=True)) / len(items), "predictions": preds,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "predictions"}))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh)


if __name__ == "__main__":
    main()
