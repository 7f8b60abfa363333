"""Answering on a memory: prefill the query only, then decode token by token.

The memory is a per-layer prefix fully visible to the query and never changed by it. Sampling
reuses transformers' logits processors; stop strings are checked on the decoded text.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from .cache import MemoryCache, join_valid
from .forward import ModelHandle, lm_logits, run
from .memory import CompressedMemory
from .prompt_cache import PromptCache

MIN_TEMPERATURE = 1e-6
"""Sampling temperatures below this sample at it (see ``stream_tokens``)."""


def memory_cache(lm: ModelHandle, memory: CompressedMemory | None) -> tuple[MemoryCache, int]:
    """A fresh cache reading ``memory`` (no copy until a layer is first used) and the first position."""
    f = lm.facts
    if memory is None:
        n = f.num_layers
        return MemoryCache([None] * n, [None] * n, [None] * n, f.windows), 0
    if memory.num_layers != f.num_layers:
        raise ValueError(f"memory has {memory.num_layers} layers, model has {f.num_layers}")
    keys = [k[None] for k in memory.keys]
    values = [v[None] for v in memory.values]
    pos = [p[0] for p in memory.positions]
    cache = MemoryCache(keys, values, pos, f.windows, memory.valid_masks, memory.logit_bias)
    cache.keep_new = False
    cache.rope_delta = memory.position_offset - memory.original_length  # type: ignore[attr-defined]  # M-RoPE
    return cache, memory.original_length


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    ttft_s: float
    decode_s: float
    stats: dict = field(default_factory=dict)


def stream_tokens(
    lm: ModelHandle,
    prompt_ids: Sequence[int],
    memory: CompressedMemory | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: Sequence[str] = (),
    seed: int | None = None,
    generator: torch.Generator | None = None,
    logits_processor: LogitsProcessorList | None = None,
    finish_when: Callable[[str, int], tuple[int, str] | None] | None = None,
    prompt_cache: PromptCache | None = None,
) -> Iterator[tuple[str, Generation | None]]:
    """Yield (text delta, None) per step and finally ("", Generation).

    ``logits_processor`` (e.g. a grammar constraint) runs on the raw logits before the sampling
    warpers, so temperature/top-p only ever choose among the tokens it allows. ``finish_when(text,
    n_tokens)`` may end the reply early: it returns (where to cut the text, finish reason) or None
    (limits that depend on what the reply turned out to be, e.g. a text reply under a tools grammar).
    ``prompt_cache``: start from the longest prefix of the prompt kept there, and keep this prompt's
    keys/values (text models; ``engine/prompt_cache.py``)."""
    if not prompt_ids:
        raise ValueError("empty prompt")
    vision = getattr(lm, "vision", None)  # prompts with images (engine/vision.py PromptIds)
    if vision is not None:
        prompt_cache = None  # image tokens and M-RoPE positions are not reused
    run_on, held = (memory, 0) if prompt_cache is None else prompt_cache.lookup(memory, prompt_ids)
    cache, start = memory_cache(lm, run_on)
    embeds, rope = (None, None) if vision is None else vision.prompt_inputs(prompt_ids, start + getattr(cache, "rope_delta", 0))
    f = lm.facts
    if f.max_positions and start - held + len(prompt_ids) + max_new_tokens > f.max_positions:
        raise ValueError(
            f"prompt ({len(prompt_ids)} tokens) + memory ({start - held}) + {max_new_tokens} new tokens exceed "
            f"the model's {f.max_positions} positions"
        )
    processors = LogitsProcessorList(logits_processor or [])
    if temperature > 0:
        # a temperature below float32's reach (1e-300 is 0.0 there) would scale logits to inf and sampling to
        # NaN; at 1e-6 the distribution is already its limit, the most likely token
        processors.append(TemperatureLogitsWarper(max(temperature, MIN_TEMPERATURE)))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
    eos = _eos_ids(lm)
    device = lm.device
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)  # multinomial wants it on the probs' device
    ids = torch.tensor([list(prompt_ids)[held:]], device=device)
    pos = start + torch.arange(len(prompt_ids) - held, device=device)[None]
    t0 = time.perf_counter()
    out_ids: list[int] = []
    text = ""
    finish = "length"
    ttft = 0.0
    for step in range(max_new_tokens):
        hidden = run(lm.model, cache, ids, pos, inputs_embeds=embeds, rope_positions=rope)
        embeds = rope = None
        logits = lm_logits(lm.model, f, hidden[:, -1])
        if step == 0:
            ttft = time.perf_counter() - t0
            if prompt_cache is not None:
                prompt_cache.add(memory, prompt_ids, cache, [w is not None for w in f.windows])
        scores = logits
        if processors:  # they see every id so far (a host-to-device copy per step, so only when asked)
            all_ids = torch.tensor([list(prompt_ids) + out_ids], device=device)
            scores = processors(all_ids, logits)  # type: ignore[arg-type]  # stubs want LongTensor/FloatTensor
        if temperature > 0:
            probs = torch.softmax(scores, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=generator)[0, 0])
        else:
            nxt = int(scores.argmax(-1)[0])
        if nxt in eos:
            finish = "stop"
            break
        out_ids.append(nxt)
        new_text = lm.tokenizer.decode(out_ids, skip_special_tokens=True)
        hit = first_stop(new_text, stop)
        ended = (hit, "stop") if hit is not None else finish_when(new_text, len(out_ids)) if finish_when else None
        if ended is not None:
            cut, finish = ended
            delta = new_text[len(text) : cut]
            if delta:
                yield delta, None
            text = new_text[:cut]
            break
        if not new_text.endswith("\ufffd"):  # hold back incomplete multi-byte characters
            delta = new_text[len(text) :]
            text = new_text
            if delta:
                yield delta, None
        ids = torch.tensor([[nxt]], device=device)
        pos = pos[:, -1:] + 1
    else:
        text = lm.tokenizer.decode(out_ids, skip_special_tokens=True)
    t_end = time.perf_counter()
    yield "", Generation(text, out_ids, len(prompt_ids), finish, ttft, t_end - t0 - ttft, {"prompt_tokens_reused": held})


def generate(lm: ModelHandle, prompt_ids: Sequence[int], memory: CompressedMemory | None = None, **kw) -> Generation:
    result: Generation | None = None
    for _, item in stream_tokens(lm, prompt_ids, memory, **kw):
        result = item
    assert result is not None
    return result


def score_continuations(
    lm: ModelHandle, prompt_ids: Sequence[int], continuations: Sequence[Sequence[int]], memory: CompressedMemory | None
) -> list[float]:
    """Summed log-probability of each continuation after the prompt (label log-likelihood)."""
    f = lm.facts
    cache, start = memory_cache(lm, memory)
    device = lm.device
    ids = torch.tensor([list(prompt_ids)], device=device)
    pos = start + torch.arange(len(prompt_ids), device=device)[None]
    hidden = run(lm.model, cache, ids, pos)
    first = torch.log_softmax(lm_logits(lm.model, f, hidden[:, -1]), -1)[0]
    scores = []
    for c in continuations:
        total = float(first[c[0]])
        if len(c) > 1:
            sub, sub_start = _fork(cache), int(pos[0, -1]) + 1
            cids = torch.tensor([list(c[:-1])], device=device)
            cpos = sub_start + torch.arange(len(c) - 1, device=device)[None]
            h = run(lm.model, sub, cids, cpos)
            lp = torch.log_softmax(lm_logits(lm.model, f, h[0]), -1)
            total += float(sum(lp[i, c[i + 1]] for i in range(len(c) - 1)))
        scores.append(total)
    return scores


def _fork(cache: MemoryCache) -> MemoryCache:
    """A cache whose prefix is everything ``cache`` holds now (the prompt included)."""
    n = len(cache.windows)
    assert cache.new_positions is not None
    keys, values, pos, valid, bias = [], [], [], [], []
    for i in range(n):
        keys.append(cache.keys[i])
        values.append(cache.values[i])
        pp = cache.prefix_positions[i]
        new = cache.new_positions[0]
        pos.append(new if pp is None else torch.cat([pp, new]))
        valid.append(join_valid([(cache.prefix_valid[i], cache.prefix_length(i)), (None, new.shape[0])]))
        b = cache.prefix_bias[i]
        bias.append(None if b is None else torch.cat([b, b.new_zeros(b.shape[0], new.shape[0])], dim=1))
    sub = MemoryCache(keys, values, pos, cache.windows, valid, bias)
    sub.keep_new = False
    sub.rope_delta = getattr(cache, "rope_delta", 0)  # type: ignore[attr-defined]
    return sub


def _eos_ids(lm: ModelHandle) -> set[int]:
    ids: set[int] = set()
    gen_cfg = getattr(lm.model, "generation_config", None)
    for src in (getattr(gen_cfg, "eos_token_id", None), getattr(lm.tokenizer, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, list | tuple):
            ids.update(int(x) for x in src)
    return ids


def first_stop(text: str, stop: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None

