"""The plain-transformers side of the independent checks (independent_full_icl.py,
independent_pruned_memory.py, kvpress_reference.py): the natural-text ICL prompt built by string
concatenation and tokenized once by the Hugging Face tokenizer, and label log-likelihoods read on a
``DynamicCache`` of the context. One copy, so the three checks score exactly the same text."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from transformers import DynamicCache

from emloc_agents.tasks import Task


@dataclass
class PlainPrompt:
    tok: Any
    context: str  # instruction + demonstrations, each followed by "\n\n"

    @classmethod
    def for_task(cls, tok: Any, task: Task, shots: int, seed: int) -> PlainPrompt:
        demos = task.sample_demos(shots, seed)
        return cls(tok, task.instruction + "\n\n" + "".join(f"{task.format_input(d.text)} {d.label}\n\n" for d in demos))

    def encode(self, text: str) -> list[int]:
        tok = self.tok
        bos = [tok.bos_token_id] if tok.bos_token_id is not None and getattr(tok, "add_bos_token", False) else []
        return bos + tok(text, add_special_tokens=False)["input_ids"]

    @cached_property
    def prefix(self) -> list[int]:
        """The cached part: it stops before the last separator, since "\\n\\n" + the next word may
        tokenize differently from "\\n\\n" alone."""
        return self.encode(self.context.rstrip("\n"))[:-1]

    def prefill(self, model: Any) -> DynamicCache:
        cache = DynamicCache()
        with torch.inference_mode():
            model(input_ids=torch.tensor([self.prefix]), past_key_values=cache, use_cache=True)
        return cache

    def label_scores(self, model: Any, cache: DynamicCache, query: str, labels: Sequence[str],
                     check: Callable[[list[int]], None] | None = None) -> list[float]:
        """Summed log-probability of each label after context + query, the label's tokens read from
        the whole text's tokenization (``check`` sees each whole text's ids)."""
        n = len(self.prefix)
        q_ids = self.encode(self.context + query)
        assert q_ids[:n] == self.prefix, "the prefix is not a prefix of the whole text's tokens"
        scores = []
        for label in labels:
            full = self.encode(self.context + query + " " + label)
            assert full[: len(q_ids)] == q_ids, f"label {label!r} changes the query's tokens"
            if check is not None:
                check(full)
            rest = full[n:]
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor([rest]), past_key_values=cache, use_cache=True).logits[0].float()
            cache.crop(n - cache.get_seq_length())  # drop this label's tokens again
            lp = torch.log_softmax(logits, -1)
            scores.append(float(sum(lp[i - 1, rest[i]] for i in range(len(q_ids) - n, len(rest)))))
        return scores

    def predict(self, model: Any, cache: DynamicCache, query: str, labels: Sequence[str],
                check: Callable[[list[int]], None] | None = None) -> str:
        scores = self.label_scores(model, cache, query, labels, check)
        return labels[max(range(len(scores)), key=scores.__getitem__)]
