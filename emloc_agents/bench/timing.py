"""Timings that hold on a GPU too: every clock read follows a device synchronisation, and decoding
is timed per token after the first (the prefill), with the end-of-sequence token held back so
that every run decodes the same number of tokens."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import LogitsProcessorList, MinNewTokensLengthLogitsProcessor

from ..engine.decode import _eos_ids, generate

DECODE_TOKENS = 32


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of ``fn()``, the device idle at both ends."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def median_time(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    return statistics.median(timed(fn, device)[0] for _ in range(repeats))


@torch.inference_mode()
def plain_prefill(lm: Any, ids: Sequence[int]) -> None:
    """One transformers forward of ``ids`` into a ``DynamicCache`` (the whole KV), last logits only."""
    from transformers import DynamicCache

    lm.model(input_ids=torch.tensor([list(ids)], device=lm.device), cache=DynamicCache(config=lm.model.config),
             use_cache=True, logits_to_keep=1)


@torch.inference_mode()
def hf_decode_per_token(lm: Any, ids: Sequence[int], repeats: int = 3, tokens: int = DECODE_TOKENS) -> float:
    """Seconds per new token of transformers' greedy ``generate`` after ``ids``: the time of
    1 + ``tokens`` new tokens minus the time of 1 (the prefill), over ``tokens``."""
    x = torch.tensor([list(ids)], device=lm.device)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id

    def gen(n: int) -> Callable[[], Any]:
        return lambda: lm.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                         do_sample=False, pad_token_id=pad)

    gen(2)()  # warm-up at this length
    return (median_time(gen(1 + tokens), lm.device, repeats) - median_time(gen(1), lm.device, repeats)) / tokens


def engine_decode_per_token(lm: Any, ids: Sequence[int], memory: Any, repeats: int = 3,
                            tokens: int = DECODE_TOKENS) -> float:
    """Seconds per token after the first of the engine's greedy ``generate`` on ``memory`` (None: no
    memory), end-of-sequence held back as transformers' ``min_new_tokens`` does."""
    eos = sorted(_eos_ids(lm))
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        hold = LogitsProcessorList([MinNewTokensLengthLogitsProcessor(len(ids), 1 + tokens, eos,
                                                                     device=str(lm.device))])
        sync(lm.device)
        g = generate(lm, ids, memory, max_new_tokens=1 + tokens, logits_processor=hold)
        sync(lm.device)
        times.append(g.decode_s / max(1, len(g.token_ids) - 1))
    return statistics.median(times[1:])
