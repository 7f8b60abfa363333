"""KVzip as shipped by NVIDIA kvpress (0.5.5, ``KVzipPress``) on natural-text ICL: the off-the-shelf
baseline the fidelity issue measures the memory against, scored like scripts/independent_full_icl.py
(same prompt text, same label log-likelihood, plain transformers).

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
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

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
    demos = task.sample_demos(args.shots, args.seed)
    context = task.instruction + "\n\n" + "".join(f"{task.format_input(d.text)} {d.label}\n\n" for d in demos)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None and getattr(tok, "add_bos_token", False) else []

    def encode(text: str) -> list[int]:
        return bos + tok(text, add_special_tokens=False)["input_ids"]

    prefix = encode(context.rstrip("\n"))[:-1]  # as in independent_full_icl.py
    n_prefix = len(prefix)
    cache = DynamicCache()
    t0 = time.perf_counter()
    with torch.inference_mode(), KVzipPress(compression_ratio=1 - args.keep)(model):
        model(input_ids=torch.tensor([prefix]), past_key_values=cache, use_cache=True)
    compress_s = time.perf_counter() - t0
    masked = [getattr(layer.self_attn, "masked_key_indices", None) for layer in model.model.layers]
    pairs = len(masked) * model.config.num_key_value_heads * n_prefix
    kept = 1 - sum(0 if m is None else len(m[0]) for m in masked) / pairs

    items = task.test[: args.limit]
    preds = []
    for ex in items:
        query = task.format_input(ex.text)
        q_ids = encode(context + query)
        scores = []
        for label in task.labels:
            rest = encode(context + query + " " + label)[n_prefix:]
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor([rest]), past_key_values=cache, use_cache=True).logits[0].float()
            cache.crop(n_prefix - cache.get_seq_length())
            lp = torch.log_softmax(logits, -1)
            start = len(q_ids) - n_prefix
            scores.append(float(sum(lp[i - 1, rest[i]] for i in range(start, len(rest)))))
        preds.append(task.labels[max(range(len(scores)), key=scores.__getitem__)])
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
