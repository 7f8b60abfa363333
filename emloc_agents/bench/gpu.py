"""GPU check (``python -m emloc_agents.bench.gpu --out DIR``): what compression and decoding cost on
random-weight models of real shapes, against one plain prefill and transformers' own ``generate``,
in one results file (``gpu.json``).

The models are random-weight Qwen2 shapes (1.5B, 7B) with a real tokenizer (``--tokenizer DIR``;
default: Qwen2.5's, when its package is installed), so a GPU host needs no model weights.
Random weights make the JS search's decisions meaningless, so its cost is bracketed: ``delta=1``
accepts every first candidate (the cheapest search), ``delta=0`` rejects every one (the dearest),
and the default delta lands wherever random logits put it. The ratios it reports, with their targets:

- ``compress_over_prefill``: compression / one plain prefill of the same tokens (target <= 10 on a GPU);
- ``chunkwise_over_prefill``: the unpruned chunk-wise prefill alone, the floor under any search;
- decoding per token on a memory (``delta=1``, about 10 % kept) vs on the full prefix, in our
  engine and in transformers' ``generate`` (target: memory <= full, and <= 1.2x ``generate`` on a
  prefix as long as the memory).

Every timing synchronises the device before reading the clock; each is the median of ``--repeats``
after a warm-up on the same model. CPU runs work too (``--device cpu --shapes qwen2-tiny``), which is
how the script is tested here.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..config import EMLoCConfig
from ..engine import compress, forward
from ..engine.presses import default_lookahead
from ..models.lm import LanguageModel
from ..models.loader import resolve_device, resolve_dtype
from ..skills import Skill
from ..tasks import Task
from .presses import StreamingLLMPress
from .run import machine_info
from .scaling import code_state
from .timing import engine_decode_per_token, hf_decode_per_token, median_time, plain_prefill, sync, timed

_QWEN2 = dict(model_type="qwen2", max_position_embeddings=32768, rope_theta=1_000_000.0, bos_token_id=151643,
              eos_token_id=151645, pad_token_id=151643)
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2-1.5b": dict(_QWEN2, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2-7b": dict(_QWEN2, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "qwen2-0.5b": dict(_QWEN2, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2-tiny": dict(_QWEN2, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}


def random_model(shape: str, tokenizer: Any, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LanguageModel:
    """A random-weight model of ``shape``, made on ``device`` (no host copy of 7B weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return LanguageModel(model, tokenizer, f"random-{shape}")


def default_tokenizer(path: str | None) -> Any:
    from transformers import AutoTokenizer

    if path:
        return AutoTokenizer.from_pretrained(path)
    from ..models.sources import resolve_model_dir

    return AutoTokenizer.from_pretrained(resolve_model_dir("qwen2.5-coder-0.5b"))


def skill_of_length(lm: LanguageModel, tokens: int, task: str = "trec", seed: int = 0) -> Skill:
    """The task's demonstrations, as many as render to about ``tokens`` tokens."""
    t = Task.load(task)
    shots = 32
    for _ in range(3):  # demonstrations differ in length: re-estimate from the last draw
        probe = t.skill(shots, seed)
        per_demo = len(lm.renderer("auto").render(probe.instruction, probe.demonstrations).ids) / shots
        shots = min(len(t.pool), max(1, round(tokens / per_demo)))
    return t.skill(shots, seed)


def check_context(lm: LanguageModel, skill: Skill, prefill_s: float, log: Callable[[str], None]) -> dict[str, Any]:
    """``compression="context"`` bracketed like the chunk-wise search: delta=1 checks one share,
    delta=0 every share (then keeps the whole context); with the time of each stage."""
    out: dict[str, Any] = {}
    for delta in (1.0, 0.0):
        seconds, mem = timed(partial(compress, lm, skill, EMLoCConfig(compression="context", delta=delta)), lm.device)
        stages = {k: mem.stats[k] for k in ("prefill_s", "reconstruct_s", "held_out_s", "check_s")}
        out[f"delta={delta:g}"] = {"compress_s": seconds, "compress_over_prefill": seconds / prefill_s,
                                   "kept_ratio": mem.kept_ratio, **stages,
                                   **{k.replace("_s", "_over_prefill"): v / prefill_s for k, v in stages.items()}}
        log(f"  context delta={delta:g}: {seconds:.2f}s = {seconds / prefill_s:.1f}x prefill ("
            + ", ".join(f"{k} {v:.2f}s" for k, v in stages.items()) + f"), kept {mem.kept_ratio:.3f}")
    return out


def check_case(lm: LanguageModel, tokens: int, deltas: Sequence[float], repeats: int, decode: bool,
               log: Callable[[str], None], lookahead: int | None = None, context: bool = False) -> dict[str, Any]:
    """One model at one context length: prefill, chunk-wise floor, compression per delta (and in
    context mode), decoding."""
    dev = lm.device
    skill = skill_of_length(lm, tokens)
    ids = lm.renderer("auto").render(skill.instruction, skill.demonstrations).ids
    search = {} if lookahead is None else {"lookahead": lookahead}
    row: dict[str, Any] = {"model": lm.name, "shots": len(skill.demonstrations), "tokens": len(ids),
                           "lookahead": lookahead or default_lookahead(lm.device)}
    plain_prefill(lm, ids[: min(len(ids), 512)])  # warm-up
    row["prefill_s"] = median_time(lambda: plain_prefill(lm, ids), dev, repeats)
    full_cfg = EMLoCConfig(keep_ratios=(1.0,))
    row["chunkwise_s"], full_mem = timed(lambda: compress(lm, skill, full_cfg), dev)
    row["chunkwise_over_prefill"] = row["chunkwise_s"] / row["prefill_s"]
    log(f"{lm.name} {len(ids)} tokens: prefill {row['prefill_s']:.3f}s, chunk-wise {row['chunkwise_s']:.2f}s")
    memory = None
    for delta in deltas:
        config = EMLoCConfig(compression="chunks", delta=delta, **search)
        seconds, mem = timed(partial(compress, lm, skill, config), dev)
        key = f"delta={delta:g}"
        row[key] = {"compress_s": seconds, "compress_over_prefill": seconds / row["prefill_s"],
                    "kept_ratio": mem.kept_ratio, "replay_forwards": mem.stats["replay_forwards"],
                    "check_forwards": mem.stats["check_forwards"], "js_checks": mem.stats["js_checks"],
                    "search_s": seconds - mem.stats["prefill_s"]}
        log(f"  {key}: {seconds:.2f}s = {seconds / row['prefill_s']:.0f}x prefill, kept {mem.kept_ratio:.3f}, "
            f"{mem.stats['check_forwards']} check re-forwards, {mem.stats['js_checks']} trials")
        if delta == 1.0:
            memory = mem
    if context:
        row["context"] = check_context(lm, skill, row["prefill_s"], log)
    if decode:
        query = lm.tokenizer(" What is the capital of France?\nType:", add_special_tokens=False)["input_ids"]
        made_by = "emloc delta=1"
        if memory is None:  # only its length matters here: StreamingLLM at 10 % costs no search
            memory, made_by = compress(lm, skill, press=StreamingLLMPress(0.1)), "streaming-llm 10%"
        kept = round(memory.memory_tokens / memory.num_layers)
        d: dict[str, Any] = {
            "memory": 1e3 * engine_decode_per_token(lm, query, memory, repeats),
            "full_memory": 1e3 * engine_decode_per_token(lm, query, full_mem, repeats),
            "hf_full_prefix": 1e3 * hf_decode_per_token(lm, ids + query, repeats),
            "hf_prefix_as_long_as_memory": 1e3 * hf_decode_per_token(lm, ids[:kept] + query, repeats),
            "memory_tokens_per_layer": kept, "memory_made_by": made_by,
        }
        row["decode_ms_per_token"] = d
        d["full_over_memory"] = d["full_memory"] / d["memory"]
        d["memory_over_hf_same_length"] = d["memory"] / d["hf_prefix_as_long_as_memory"]
        d["hf_full_over_memory"] = d["hf_full_prefix"] / d["memory"]
        log(f"  decode ms/token: memory {d['memory']:.1f}, full memory {d['full_memory']:.1f}, "
            f"generate full {d['hf_full_prefix']:.1f}, generate {kept} tokens {d['hf_prefix_as_long_as_memory']:.1f}")
    return row


def profile_table(fn: Callable[[], Any], device: torch.device, rows: int = 40) -> str:
    """torch.profiler's op table of ``fn``, by device time and by host time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    table = prof.key_averages()
    by_device = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return (table.table(sort_by=by_device, row_limit=rows) + "\n\n"
            + table.table(sort_by="self_cpu_time_total", row_limit=rows))


def parse_case(text: str) -> tuple[str, int, list[float], int | None]:
    """``shape:tokens[:deltas[:lookahead]]``, e.g. ``qwen2-1.5b:3500:1,0.005,0:8``; deltas ``-``: no
    compression timed (decoding only)."""
    parts = text.split(":")
    if len(parts) not in (2, 3, 4) or parts[0] not in SHAPES:
        raise argparse.ArgumentTypeError(
            f"case {text!r}: want shape:tokens[:deltas[:lookahead]], shape one of {sorted(SHAPES)}")
    deltas = [1.0, 0.005, 0.0]
    if len(parts) > 2 and parts[2]:
        deltas = [] if parts[2] == "-" else [float(x) for x in parts[2].split(",")]
    return parts[0], int(parts[1]), deltas, int(parts[3]) if len(parts) == 4 else None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m emloc_agents.bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--case", type=parse_case, action="append", dest="cases",
                   help="shape:tokens[:deltas[:lookahead]] (repeatable); default: the 1.5B and 7B "
                   "shapes at 3.5k and 14k tokens")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: Qwen2.5's from its package)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-decode", action="store_true")
    p.add_argument("--context", action="store_true", help='also time compression="context" (delta 1 and 0)')
    p.add_argument("--cudnn-attention", action="store_true",
                   help="let engine forwards use cuDNN's SDPA kernel too (engine.forward.CUDA_ATTENTION_BACKENDS)")
    p.add_argument("--profile", metavar="SHAPE:TOKENS", default=None,
                   help="also write profile.txt: torch.profiler's op table for one compression")
    p.add_argument("--profile-compression", choices=("auto", "chunks", "context"), default="auto",
                   help="the compression --profile times (default: the default, auto)")
    args = p.parse_args(argv)
    backends = forward.CUDA_ATTENTION_BACKENDS
    if args.cudnn_attention:
        forward.CUDA_ATTENTION_BACKENDS = None
    try:
        return run_checks(args)
    finally:
        forward.CUDA_ATTENTION_BACKENDS = backends


def run_checks(args: argparse.Namespace) -> int:
    """The profile and every case of ``args``, into ``args.out / "gpu.json"``."""
    cases = args.cases or [parse_case(c) for c in ("qwen2-1.5b:3500", "qwen2-1.5b:14000:1,0.005", "qwen2-7b:3500")]
    device = resolve_device(args.device)
    dtype = getattr(torch, resolve_dtype(args.dtype, device))
    args.out.mkdir(parents=True, exist_ok=True)
    tok = default_tokenizer(args.tokenizer)
    result: dict[str, Any] = {"machine": machine_info(), "code": code_state(), "device": str(device),
                              "dtype": str(dtype).removeprefix("torch."), "cudnn_attention": args.cudnn_attention,
                              "rows": []}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    if args.profile:
        shape, tokens = args.profile.split(":")
        lm = random_model(shape, tok, device, dtype)  # profiled first: a timeout later cannot lose it
        skill = skill_of_length(lm, int(tokens))
        profiled = EMLoCConfig(compression=args.profile_compression)
        compress(lm, skill, profiled)  # warm-up
        (args.out / "profile.txt").write_text(profile_table(lambda: compress(lm, skill, profiled), device))
        log(f"wrote {args.out / 'profile.txt'}")
        del lm
    models: dict[str, LanguageModel] = {}
    for shape, tokens, deltas, lookahead in cases:
        if shape not in models:
            models.clear()  # one model on the device at a time
            if device.type == "cuda":
                torch.cuda.empty_cache()
            models[shape] = random_model(shape, tok, device, dtype)
            warm = skill_of_length(models[shape], 200)
            for warm_up in ("chunks", "context"):  # kernels, allocator
                compress(models[shape], warm, EMLoCConfig(compression=warm_up, delta=0.005))
        row = check_case(models[shape], tokens, deltas, args.repeats, not args.no_decode, log, lookahead,
                         args.context)
        result["rows"].append(row)
        (args.out / "gpu.json").write_text(json.dumps(result, indent=1))  # partial results survive a timeout
    result["total_s"] = time.perf_counter() - t_start
    (args.out / "gpu.json").write_text(json.dumps(result, indent=1))
    log(f"wrote {args.out / 'gpu.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
