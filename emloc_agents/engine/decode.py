"""Answering on a memory: prefill the query only, then decode token by token.

The memory is a per-layer prefix fully visible to the query and never changed by it. Sampling
reuses transformers' logits processors; stop strings are checked on the decoded text.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

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


class _Reply:
    """One reply being decoded: its sampling, its stops and its text so far. ``take`` turns one row of
    logits into the next token and the text it adds; ``finish`` is set once the reply has ended. The
    single and the batched decoding loops (``stream_tokens``, ``stream_batch``) share it, so a reply
    decoded in a batch ends exactly where it would alone."""

    def __init__(
        self,
        lm: ModelHandle,
        prompt_ids: Sequence[int],
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        generator: torch.Generator | None = None,
        logits_processor: LogitsProcessorList | None = None,
        finish_when: Callable[[str, int], tuple[int, str] | None] | None = None,
    ) -> None:
        if not prompt_ids:
            raise ValueError("empty prompt")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.lm, self.prompt_ids, self.max_new_tokens = lm, list(prompt_ids), max_new_tokens
        self.temperature, self.stop, self.finish_when = temperature, stop, finish_when
        self.processors = LogitsProcessorList(logits_processor or [])
        if temperature > 0:
            # a temperature below float32's reach (1e-300 is 0.0 there) would scale logits to inf and sampling to
            # NaN; at 1e-6 the distribution is already its limit, the most likely token
            self.processors.append(TemperatureLogitsWarper(max(temperature, MIN_TEMPERATURE)))
            if top_p < 1.0:
                self.processors.append(TopPLogitsWarper(top_p))
        if generator is None and seed is not None:
            generator = torch.Generator(device=lm.device).manual_seed(seed)  # multinomial wants the probs' device
        self.generator = generator
        self.eos = _eos_ids(lm)
        self.out_ids: list[int] = []
        self.text = ""
        self.finish: str | None = None  # "stop", "length" or a finish_when reason once ended

    def take(self, logits: torch.Tensor) -> str:
        """The next token from ``logits`` (1, vocab); returns the text it adds (possibly empty)."""
        scores = logits
        if self.processors:  # they see every id so far (a host-to-device copy per step, so only when asked)
            all_ids = torch.tensor([self.prompt_ids + self.out_ids], device=logits.device)
            scores = self.processors(all_ids, logits)  # type: ignore[arg-type]  # stubs want LongTensor/FloatTensor
        if self.temperature > 0:
            probs = torch.softmax(scores, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=self.generator)[0, 0])
        else:
            nxt = int(scores.argmax(-1)[0])
        if nxt in self.eos:
            self.finish = "stop"
            return ""
        self.out_ids.append(nxt)
        new_text = self.lm.tokenizer.decode(self.out_ids, skip_special_tokens=True)
        hit = first_stop(new_text, self.stop)
        ended = (hit, "stop") if hit is not None else (
            self.finish_when(new_text, len(self.out_ids)) if self.finish_when else None)
        delta = ""
        if ended is not None:
            cut, self.finish = ended
            delta, self.text = new_text[len(self.text) : cut], new_text[:cut]
        elif not new_text.endswith("\ufffd"):  # hold back incomplete multi-byte characters
            delta, self.text = new_text[len(self.text) :], new_text
        if self.finish is None and len(self.out_ids) >= self.max_new_tokens:
            self.finish, self.text = "length", new_text  # what was held back comes with the final text
        return delta

    def result(self, ttft: float, t0: float, stats: dict) -> Generation:
        assert self.finish is not None
        return Generation(self.text, self.out_ids, len(self.prompt_ids), self.finish, ttft,
                          time.perf_counter() - t0 - ttft, stats)


def check_length(lm: ModelHandle, prompt_tokens: int, memory_tokens: int, max_new_tokens: int) -> None:
    """ValueError when the memory, the prompt and the reply would not fit the model's positions."""
    limit = lm.facts.max_positions
    if limit and memory_tokens + prompt_tokens + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({prompt_tokens} tokens) + memory ({memory_tokens}) + {max_new_tokens} new tokens exceed "
            f"the model's {limit} positions"
        )


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
    reply = _Reply(lm, prompt_ids, max_new_tokens, temperature, top_p, stop, seed, generator, logits_processor,
                   finish_when)
    vision = getattr(lm, "vision", None)  # prompts with images (engine/vision.py PromptIds)
    if vision is not None:
        prompt_cache = None  # image tokens and M-RoPE positions are not reused
    run_on, held = (memory, 0) if prompt_cache is None else prompt_cache.lookup(memory, prompt_ids)
    cache, start = memory_cache(lm, run_on)
    embeds, rope = (None, None) if vision is None else vision.prompt_inputs(prompt_ids, start + getattr(cache, "rope_delta", 0))
    f = lm.facts
    check_length(lm, len(prompt_ids), start - held, max_new_tokens)
    device = lm.device
    ids = torch.tensor([list(prompt_ids)[held:]], device=device)
    pos = start + torch.arange(len(prompt_ids) - held, device=device)[None]
    t0 = time.perf_counter()
    ttft = 0.0
    for step in range(max_new_tokens):
        hidden = run(lm.model, cache, ids, pos, inputs_embeds=embeds, rope_positions=rope)
        embeds = rope = None
        logits = lm_logits(lm.model, f, hidden[:, -1])
        if step == 0:
            ttft = time.perf_counter() - t0
            if prompt_cache is not None:
                prompt_cache.add(memory, prompt_ids, cache, [w is not None for w in f.windows])
        delta = reply.take(logits)
        if delta:
            yield delta, None
        if reply.finish is not None:
            break
        ids = torch.tensor([[reply.out_ids[-1]]], device=device)
        pos = pos[:, -1:] + 1
    yield "", reply.result(ttft, t0, {"prompt_tokens_reused": held})


def stream_batch(
    lm: ModelHandle,
    prompts: Sequence[Sequence[int]],
    memory: CompressedMemory | None = None,
    options: Sequence[dict[str, Any]] | None = None,
    cancelled: Callable[[int], bool] | None = None,
) -> Iterator[tuple[int, str, Generation | None]]:
    """Decode several replies on one memory together: yields (reply index, text delta, None) and,
    once reply ``i`` has ended, (i, "", Generation).

    The prompts are packed into one row (each a segment that sees the memory and its own tokens
    only, ``MemoryCache.begin``) and prefilled in one forward; each step then decodes one token of
    every reply still running in one forward. Each reply keeps its own ``options`` (the keyword
    arguments of ``stream_tokens`` but ``prompt_cache``), so it ends where it would alone; its tokens
    agree with decoding it alone up to float rounding. ``cancelled(i)``, checked every step, drops a
    reply without a result. Text prompts only (image prompts carry their own embeddings)."""
    if getattr(lm, "vision", None) is not None:
        raise ValueError("batched decoding takes text prompts; decode prompts with images one by one")
    if not prompts:
        return
    options = list(options) if options is not None else [{} for _ in prompts]
    if len(options) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(options)} option sets")
    replies = [_Reply(lm, p, **o) for p, o in zip(prompts, options, strict=True)]
    cache, start = memory_cache(lm, memory)
    for r in replies:
        check_length(lm, len(r.prompt_ids), start, r.max_new_tokens)
    device, f = lm.device, lm.facts
    lengths = [len(r.prompt_ids) for r in replies]
    ids = torch.tensor([[t for r in replies for t in r.prompt_ids]], device=device)
    pos = torch.cat([start + torch.arange(n, device=device) for n in lengths])[None]
    segments = torch.cat([torch.full((n,), i, device=device) for i, n in enumerate(lengths)])[None]
    last = torch.tensor(lengths, device=device).cumsum(0) - 1
    t0 = time.perf_counter()
    hidden = run(lm.model, cache, ids, pos, segments=segments)
    logits = lm_logits(lm.model, f, hidden[0, last])
    ttft = time.perf_counter() - t0
    stats = {"prompt_tokens_reused": 0, "batch_size": len(replies)}
    running = list(range(len(replies)))
    next_pos = [start + n for n in lengths]
    while running:
        still = []
        for row, i in enumerate(running):
            if cancelled is not None and cancelled(i):
                continue
            reply = replies[i]
            delta = reply.take(logits[row : row + 1])
            if delta:
                yield i, delta, None
            if reply.finish is not None:
                yield i, "", reply.result(ttft, t0, stats)
            else:
                still.append(i)
        running = still
        if not running:
            break
        ids = torch.tensor([[replies[i].out_ids[-1] for i in running]], device=device)
        pos = torch.tensor([[next_pos[i] for i in running]], device=device)
        for i in running:
            next_pos[i] += 1
        hidden = run(lm.model, cache, ids, pos, segments=torch.tensor([running], device=device))
        logits = lm_logits(lm.model, f, hidden[0])


class SplitBatch:
    """The replies of one ``stream_batch`` as separate iterators of (text delta, final) pairs, as
    ``stream_tokens`` yields them, to be read in any order from one thread: reading one advances the
    shared decode and keeps the other replies' pairs until they are read. Closing a reply's iterator
    drops that reply from the decode; an error in the decode reaches every reply still read."""

    def __init__(self, lm: ModelHandle, prompts: Sequence[Sequence[int]], memory: CompressedMemory | None,
                 options: Sequence[dict[str, Any]]) -> None:
        self._closed = [False] * len(prompts)
        self._pending: list[deque[tuple[str, Generation | None]]] = [deque() for _ in prompts]
        self._events = stream_batch(lm, prompts, memory, options, cancelled=self._closed.__getitem__)
        self._error: BaseException | None = None

    def reply(self, i: int) -> Iterator[tuple[str, Generation | None]]:
        try:
            while True:
                while not self._pending[i]:
                    self._pull()
                delta, final = self._pending[i].popleft()
                yield delta, final
                if final is not None:
                    return
        finally:
            self._closed[i] = True
            self._pending[i].clear()

    def _pull(self) -> None:
        if self._error is not None:
            raise self._error
        try:
            i, delta, final = next(self._events)
        except StopIteration:
            raise RuntimeError("the batched decode ended before every reply was read") from None
        except BaseException as e:
            self._error = e
            raise
        if not self._closed[i]:
            self._pending[i].append((delta, final))


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

