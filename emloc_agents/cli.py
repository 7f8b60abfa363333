"""`emloc`: demo, compress, chat, skills ls|info|rm|export|import, bench, serve.

Every user mistake prints one line on stderr and exits non-zero, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, cast

from .skills import Skill, SkillError

if TYPE_CHECKING:
    from langchain_core.messages.ai import UsageMetadata

    from .registry import MemoryRegistry
    from .store import LockingByteStore

USER_ERRORS: tuple[type[BaseException], ...] = (SkillError, FileNotFoundError, ValueError, KeyError, TypeError)
CLI_MODEL = "smollm2-135m"
"""The CLI's model unless ``--model`` or ``EMLOC_DEFAULT_MODEL`` says otherwise: the library's default
(``models.sources.DEFAULT_MODEL``), SmolLM2-135M-Instruct, which the package carries, so ``emloc demo`` runs
after a plain ``pip install emloc-agents``. Its 20 % memory agrees with full ICL on 0.960 / 0.946 of
SST-2 / TREC answers (docs/benchmarks.md). It has no tool-call format of its own, so the demo's agent loop
needs a Qwen2.5-Coder (extra ``qwen`` or ``qwen-1.5b``, ``emloc --model qwen2.5-coder-0.5b demo``)."""


def _registry(args: argparse.Namespace, progress: bool = True, store: LockingByteStore | None = None):
    from .config import EMLoCConfig
    from .registry import MemoryRegistry

    return MemoryRegistry(model=args.model, cache_dir=args.cache_dir, progress=progress, store=store,
                          device=getattr(args, "device", "auto"), dtype=getattr(args, "dtype", "auto"),
                          config=EMLoCConfig(compression=getattr(args, "compression", "auto")))


def demo_skills() -> list[Skill]:
    """The two skills that ship with the package (hand-written demonstrations)."""
    files = resources.files("emloc_agents") / "data"
    return [Skill.from_file(Path(str(files / n))) for n in ("sentiment.json", "topic.json")]


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.1f} s"


def cmd_demo(args: argparse.Namespace) -> int:
    from .chat_model import EMLoCChatModel

    t0 = time.perf_counter()
    reg = _registry(args)
    lm = reg.lm
    print(f"model: {lm!r} loaded in {time.perf_counter() - t0:.1f}s")
    skills = demo_skills()
    for s in skills:
        reg.add(s)
    for s in skills:
        was_cached = reg.cached(s)
        mem = reg.get(s)
        info = reg.info(s)
        assert info is not None
        how = "loaded from disk" if info.source == "store" else "compressed"
        print(f"\nskill {s.name!r}: {len(s.demonstrations)} demonstrations, {how} in {_duration(info.seconds)}"
              + (" (cached by an earlier run)" if was_cached else ""))
        print("  " + mem.describe())
        full = [n for n, sl in zip(mem.layer_lengths, mem.sliding, strict=True) if not sl]
        print(f"  per-layer kept tokens (full-attention layers): {full}")
    chat = EMLoCChatModel(registry=reg, max_tokens=4, stop=["\n"])
    queries = [
        ("sentiment", "Review: A warm, funny film that I loved.\nSentiment:"),
        ("sentiment", "Review: Boring characters and a plot full of holes.\nSentiment:"),
        ("topic", "Headline: The goalkeeper saved a late penalty to win the match.\nTopic:"),
        ("topic", "Headline: The company reported record profits this quarter.\nTopic:"),
    ]
    print("\nquery -> zero-shot | with skill (switched per call)")
    for skill, q in queries:
        zero = chat.invoke(q).content
        resp = chat.invoke(q, skill=skill)
        line = q.splitlines()[0]
        usage = cast("UsageMetadata", resp.usage_metadata)  # always set by EMLoCChatModel
        print(f"  [{skill:9}] {line[:60]:60} -> {str(zero).strip()!r:14} | {str(resp.content).strip()!r} "
              f"(ttft {resp.response_metadata['ttft_s'] * 1000:.0f} ms, memory {usage['input_token_details']['cache_read']} tok)")
    _agent_demo(reg)
    print(f"\nmemories live in {reg.cache_dir}; run `emloc demo` again to load them from disk.")
    return 0


AGENT_REQUESTS = (
    "Is this movie review positive or negative? 'A warm, funny film that I loved.'",
    "Which topic is this headline about: 'The goalkeeper saved a late penalty to win the match.'",
    "Hello! What can you do?",
)


def _agent_demo(reg: MemoryRegistry) -> None:
    """An agent loop on the skills as tools, the model choosing (``tool_choice="auto"``): only on a
    model with a tool-call format of its own (``tool_format``); the others do not call unforced."""
    from langchain_core.messages import HumanMessage

    from .chat_model import EMLoCChatModel
    from .tool_format import tool_format

    if not tool_format(reg.lm.tokenizer).native:
        print(f"\nagent: skipped: {reg.model_name} has no tool-call format of its own and does not call tools "
              "unforced; for the agent loop: pip install 'emloc-agents[qwen]' and run "
              "`emloc --model qwen2.5-coder-0.5b demo`.")
        return
    tools = reg.as_tools(EMLoCChatModel(registry=reg, max_tokens=4, stop=["\n"]))
    by_name = {t.name: t for t in tools}
    chat = EMLoCChatModel(registry=reg, max_tokens=48)
    agent = chat.bind_tools(tools)  # the model decides: a skill tool, or a text answer
    print("\nagent (the model picks a skill tool, or none):")
    for request in AGENT_REQUESTS:
        print(f"  user: {request}")
        ai = agent.invoke([HumanMessage(request)])
        if not ai.tool_calls:
            text = str(ai.content).strip()
            looks_like_call = text.startswith(("{", "```"))  # a call of a tool it invented: kept as text
            print(f"  assistant{' (text: it named no bound tool)' if looks_like_call else ''}: {text}")
            continue
        results = []
        for call in ai.tool_calls:
            result = by_name[call["name"]].invoke(call)
            results.append(f"Result of {call['name']}: {str(result.content).strip()}")
            print(f"  tool call: {call['name']}({json.dumps(call['args'], ensure_ascii=False)}) -> {str(result.content).strip()!r}")
        # The answer, from a fresh turn holding the results: with its own call in the history, this
        # 0.5B model repeats the call as text instead of answering (docs/benchmarks.md).
        final = chat.invoke([HumanMessage(f"{request}\n\n" + "\n".join(results) + "\nAnswer in one sentence.")])
        print(f"  assistant: {str(final.content).strip()}")


def _skills_at(path: Path) -> list[Skill]:
    """The skills in a folder or file; a task folder gives a 16-shot skill from its pool."""
    if (path / "task.json").is_file():
        from .tasks import Task

        return [Task.load(path).skill(16)]
    return Skill.from_dir(path) if path.is_dir() else [Skill.from_file(path)]


def cmd_compress(args: argparse.Namespace) -> int:
    skills = _skills_at(Path(args.skill_dir))
    reg = _registry(args)
    for s in skills:
        reg.add(s)
        mem = reg.get(s)
        info = reg.info(s)
        print(f"{s.name}: {mem.describe()} [{info.source if info else '?'}]")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat_model import EMLoCChatModel

    reg = _registry(args)
    chat = EMLoCChatModel(registry=reg, skill=args.skill, max_tokens=args.max_tokens)
    prompts = [args.prompt] if args.prompt else (line.rstrip("\n").replace("\\n", "\n") for line in sys.stdin)
    for p in prompts:
        for chunk in chat.stream(p):
            print(chunk.content, end="", flush=True)
        print()
    return 0


def cmd_skills(args: argparse.Namespace) -> int:
    reg = _registry(args)
    if args.action == "ls":
        for name in reg.names():
            s = reg.skill(name)
            print(f"{name}\t{len(s.demonstrations)} demos\t{s.summary()}")
    elif args.action == "info":
        s = reg.skill(args.name)
        print(f"name: {s.name}\ninstruction: {s.instruction}\ndemonstrations: {len(s.demonstrations)}")
        print(f"memory key: {reg.key(s)}\ncompressed: {'yes' if reg.cached(s) else 'no'}")
        if reg.cached(s):
            print("memory: " + reg.get(s).describe())
    elif args.action == "rm":
        reg.remove(args.name)
        print(f"removed {args.name}")
    elif args.action == "export":
        print(f"wrote {reg.export(args.name, args.file)}")
    elif args.action == "import":
        print(f"imported skill {reg.import_file(args.file).name!r}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """The OpenAI-compatible server (docs/serving.md); its dependencies are the ``serve`` extra."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print("emloc: error: `emloc serve` needs the serve extra: pip install 'emloc-agents[serve]'", file=sys.stderr)
        return 2
    if args.ray:
        return _serve_on_ray(args)
    if args.replicas != 1:
        raise ValueError("--replicas needs --ray (one process serves one replica)")
    from .chat_model import EMLoCChatModel
    from .serve import create_app, run

    skills = _skills_at(Path(args.skills)) if args.skills else []
    reg = _registry(args, progress=False, store=_store_at(args.store))
    for s in skills:
        reg.add(s)
    api_key = args.api_key or os.environ.get("EMLOC_API_KEY") or None
    reg.lm  # noqa: B018 - loaded now, not by the first request
    if args.warm:
        for name, info in reg.warm().items():
            print(f"{name}: {info.source} in {_duration(info.seconds)}", flush=True)
    app = create_app(EMLoCChatModel(registry=reg, max_tokens=args.max_tokens), api_key=api_key,
                     max_queue=args.max_queue, max_batch=args.max_batch)
    print(f"emloc serve: http://{args.host}:{args.port}/v1 model {reg.model_name!r}, skills: "
          f"{', '.join(reg.names()) or 'none'}{'; API key required' if api_key else ''}", flush=True)
    run(app, host=args.host, port=args.port)
    return 0


def _store_at(url: str | None) -> LockingByteStore | None:
    """``--store``: a Redis URL (``redis://HOST:PORT/DB``, ``rediss://`` for TLS), or None for the
    diskcache store under ``--cache-dir``."""
    if url is None:
        return None
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"--store takes a Redis URL (redis://HOST:PORT/DB), got {url!r}")
    from .store import RedisStore

    return RedisStore(url=url)


def _serve_on_ray(args: argparse.Namespace) -> int:
    """``emloc serve --ray``: the same API on Ray Serve replicas sharing the Redis store ``--store``
    (docs/serving.md#ray-serve); the ``ray`` extra."""
    if not args.store:
        raise ValueError("--ray needs --store redis://HOST:PORT/DB: the store every replica shares, "
                         "reachable from every node")
    try:
        import ray
        from ray import serve
    except ImportError:
        print("emloc: error: `emloc serve --ray` needs the ray extra: pip install 'emloc-agents[ray]'", file=sys.stderr)
        return 2
    from .ray_serve import build_app, chat_factory

    store = _store_at(args.store)
    skills = _skills_at(Path(args.skills)) if args.skills else []
    reg = _registry(args, progress=False, store=store)
    for s in skills:
        reg.add(s)  # into the shared store: no model is loaded here, the replicas read it from there
    api_key = args.api_key or os.environ.get("EMLOC_API_KEY") or None
    factory = chat_factory(args.model, args.store, device=args.device, dtype=args.dtype,
                           compression=getattr(args, "compression", "auto"), max_tokens=args.max_tokens)
    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM as Ctrl+C: the deployment and a local cluster are shut down below

    ray.init(address=args.ray_address)  # None: $RAY_ADDRESS, a cluster started on this host, else a local one
    signal.signal(signal.SIGTERM, stop)  # after ray.init, which sets its own handler (it aborts the process)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(factory, replicas=args.replicas, warm=args.warm,
                            app_options={"api_key": api_key, "max_queue": args.max_queue,
                                         "max_batch": args.max_batch}),
                  name="emloc", route_prefix="/")
        print(f"emloc serve: http://{args.host}:{args.port}/v1 model {reg.model_name!r} on {args.replicas} Ray Serve "
              f"replicas, store {args.store}, skills: {', '.join(reg.names()) or 'none'}"
              f"{'; API key required' if api_key else ''}", flush=True)
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
        ray.shutdown()


def cmd_bench(argv: list[str]) -> int:
    if "--serve" in argv:
        from .models.sources import ModelSourceError

        handled: tuple[type[BaseException], ...] = (*USER_ERRORS, ModelSourceError)
        try:
            return _bench_serve([a for a in argv if a != "--serve"])
        except handled as e:
            print(f"emloc bench: error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
    from .bench.cli import bench_main

    return bench_main(argv)


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{option} takes comma-separated integers, got {text!r}") from None


def _bench_serve(argv: list[str]) -> int:
    """``emloc bench --serve``: requests/s and p50/p95 latency of ``emloc serve`` at 1, 4 and 16 concurrent
    clients (``emloc_agents.serve.bench``); a results JSON and a Markdown table."""
    p = argparse.ArgumentParser(prog="emloc bench --serve",
                                description="Requests/s and latency of the server at several numbers of clients.")
    p.add_argument("--model", default=None, help=f"as for emloc serve (default: $EMLOC_DEFAULT_MODEL, else {CLI_MODEL})")
    p.add_argument("--task", default="sst2", help="the task whose skill is served and whose test inputs are sent")
    p.add_argument("--shots", type=_int_in(1, None), default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skill-name", default=None, help="the skill's name (default: the task's)")
    p.add_argument("--clients", default="1,4,16", help="comma list of concurrent clients")
    p.add_argument("--requests", type=_int_in(1, None), default=64, help="requests at each number of clients")
    p.add_argument("--max-tokens", type=_int_in(1, None), default=4)
    p.add_argument("--max-batch", default="1,16",
                   help="comma list: the most waiting requests the server answers together, a server each (1: one at a time)")
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default=None, metavar="DIR", help="where serving.json goes (default results/serve-<timestamp>)")
    args = p.parse_args(argv)
    clients, max_batch = _int_list(args.clients, "--clients"), _int_list(args.max_batch, "--max-batch")
    try:
        import fastapi  # noqa: F401
        import httpx  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print("emloc: error: `emloc bench --serve` needs the serve extra: pip install 'emloc-agents[serve]'",
              file=sys.stderr)
        return 2
    from .serve.bench import markdown, run_serving_bench

    out = args.out or f"results/serve-{time.strftime('%Y%m%d-%H%M%S')}"
    result = run_serving_bench(args.model or os.environ.get("EMLOC_DEFAULT_MODEL") or CLI_MODEL, task=args.task,
                               shots=args.shots, seed=args.seed, skill_name=args.skill_name, clients=clients,
                               requests=args.requests, max_tokens=args.max_tokens, max_batch=max_batch, device=args.device,
                               cache_dir=args.cache_dir, out=out)
    s = result["settings"]
    print(f"emloc bench --serve: {s['model']}, skill {s['skill']!r} ({s['shots']} shots of {s['task']}), "
          f"max_tokens {s['max_tokens']}, {s['requests_per_level']} requests per level")
    print(markdown(result), end="")
    print(f"emloc bench: written to {out}/serving.json", file=sys.stderr)
    return 0


def _int_in(low: int, high: int | None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (no upper bound when ``high`` is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is not in [{low}, {high if high is not None else 'inf'}]")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="emloc", description="EMLoC skill memories for LangChain agents")
    p.add_argument("--model", default=None,
                   help=f"smollm2-135m (carried by the package) | gemma-3-270m (extra gemma) | "
                        f"qwen2.5-coder-0.5b (extra qwen) | qwen2.5-coder-1.5b (extra qwen-1.5b) | DIR | FILE.gguf "
                        f"(default: $EMLOC_DEFAULT_MODEL, else {CLI_MODEL})")
    p.add_argument("--cache-dir", default=None, help="memory cache (default ~/.cache/emloc-agents)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when present, else cpu) | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="auto: bfloat16 on CUDA, float32 elsewhere; bfloat16 is faster on CPUs with native "
                        "bfloat16 (AVX512-BF16, AMX)")
    p.add_argument("--compression", choices=("auto", "chunks", "context", "fitted"), default="auto",
                   help="chunks: the paper's chunk-wise loop; context: the whole context ranked at once "
                        "(text skills; closer to full ICL in docs/benchmarks.md); fitted: context with the "
                        "kept slots' biases and values fitted to the full context's attention; auto: context "
                        "for text skills on text models, else chunks")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="end-to-end demo: skills, their memories, per-call switching, an agent loop").set_defaults(func=cmd_demo)
    c = sub.add_parser("compress", help="register and compress the skills in a folder or file")
    c.add_argument("skill_dir")
    c.set_defaults(func=cmd_compress)
    ch = sub.add_parser("chat", help="answer a prompt (or stdin lines) with a skill")
    ch.add_argument("prompt", nargs="?")
    ch.add_argument("--skill", default=None)
    ch.add_argument("--max-tokens", type=int, default=64)
    ch.set_defaults(func=cmd_chat)
    s = sub.add_parser("skills", help="ls | info NAME | rm NAME | export NAME FILE | import FILE")
    ss = s.add_subparsers(dest="action", required=True)
    ss.add_parser("ls")
    for action in ("info", "rm"):
        ss.add_parser(action).add_argument("name")
    ex = ss.add_parser("export")
    ex.add_argument("name")
    ex.add_argument("file")
    ss.add_parser("import").add_argument("file")
    s.set_defaults(func=cmd_skills)
    sub.add_parser("bench", help="benchmark (see `emloc bench --help`)", add_help=False)
    sv = sub.add_parser("serve", help="the OpenAI Chat Completions API over the skills (extra serve)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=_int_in(0, 65535), default=8000)
    sv.add_argument("--skills", default=None, metavar="DIR_OR_FILE", help="register these skills at start")
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $EMLOC_API_KEY)")
    sv.add_argument("--warm", action="store_true",
                    help="compress (or load) every registered skill before taking requests")
    sv.add_argument("--max-tokens", type=_int_in(1, None), default=256, help="reply length when a request sets none")
    sv.add_argument("--max-queue", type=_int_in(0, None), default=16,
                    help="requests that may wait for the model (503 past it)")
    sv.add_argument("--max-batch", type=_int_in(1, None), default=16,
                    help="the most waiting requests answered together, decoded as one batch (1: one at a time)")
    sv.add_argument("--store", default=None, metavar="URL",
                    help="keep skills and memories in Redis (redis://HOST:PORT/DB) instead of --cache-dir")
    sv.add_argument("--ray", action="store_true",
                    help="serve on Ray Serve replicas sharing --store, requests routed by skill (extra ray)")
    sv.add_argument("--replicas", type=_int_in(1, None), default=1, help="--ray: model replicas (default 1)")
    sv.add_argument("--ray-address", default=None, metavar="ADDRESS",
                    help="--ray: the cluster to join (default: $RAY_ADDRESS, one started on this host, else a new one)")
    # also accepted after the command (``emloc serve --model ...``); SUPPRESS keeps the ones given before it
    for flag in ("--model", "--cache-dir", "--device"):
        sv.add_argument(flag, default=argparse.SUPPRESS, help="as before the command")
    sv.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default=argparse.SUPPRESS,
                    help="as before the command")
    sv.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    if args.model is None:
        args.model = os.environ.get("EMLOC_DEFAULT_MODEL") or CLI_MODEL
    from .models.sources import ModelSourceError
    from .store import MemoryFormatError

    handled: tuple[type[BaseException], ...] = (*USER_ERRORS, ModelSourceError, MemoryFormatError)
    try:
        return int(args.func(args))
    except handled as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"emloc: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
