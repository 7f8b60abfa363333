"""``emloc bench --serve``: requests/s and latency of the server, at several numbers of concurrent clients.

The server (``create_app`` on ``BackgroundServer``, real HTTP on a free port) answers one skill's
chat completions; each level sends the same ``requests`` queries (the task's test inputs) from
``clients`` threads at once. The skill is compressed (or loaded) before any timing. The server runs one
model thread, so requests are answered one at a time whatever the concurrency: more clients queue, and
latency grows with them while requests/s stays near one client's.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


def _percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation between the closest ranks."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def run_serving_bench(model: str = "default", *, task: str = "sst2", shots: int = 16, seed: int = 0,
                      skill_name: str | None = None, clients: tuple[int, ...] = (1, 4, 16), requests: int = 64,
                      max_tokens: int = 4, device: str = "auto", cache_dir: str | None = None,
                      out: str | Path | None = None) -> dict[str, Any]:
    """Measure the server at each number of ``clients``; returns (and writes to ``out/serving.json``)
    the settings, the machine and one row per level: requests/s, p50/p95/mean latency, errors."""
    import httpx

    from ..chat_model import EMLoCChatModel
    from ..registry import MemoryRegistry
    from ..tasks import Task
    from .app import create_app
    from .runner import BackgroundServer

    if not clients or min(clients) < 1 or requests < 1:
        raise ValueError("clients and requests must be >= 1")
    loaded = Task.load(task)
    skill = loaded.skill(shots, seed, name=skill_name)
    if not loaded.test:
        raise ValueError(f"task {loaded.name} has no test inputs to send")
    queries = [loaded.format_input(loaded.test[i % len(loaded.test)].text) for i in range(requests)]
    registry = MemoryRegistry(model=model, device=device, cache_dir=cache_dir)
    registry.add(skill)
    memory, info = registry.get_with_info(skill)
    chat = EMLoCChatModel(registry=registry, max_tokens=max_tokens)
    app = create_app(chat, max_queue=max(clients))
    rows = []
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=600,
                                                       limits=httpx.Limits(max_connections=max(clients))) as http:
        body = {"model": f"{registry.model_name}:{skill.name}", "max_tokens": max_tokens}

        def ask(query: str) -> tuple[float, bool]:
            t0 = time.perf_counter()
            reply = http.post("/v1/chat/completions", json=body | {"messages": [{"role": "user", "content": query}]})
            return time.perf_counter() - t0, reply.status_code == 200

        for q in queries[:2]:  # warm-up: the first requests pay one-off costs (allocations, the prompt cache)
            ask(q)
        for n in clients:
            t0 = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                results = list(pool.map(ask, queries))
            wall = time.perf_counter() - t0
            latencies = [s for s, ok in results if ok]
            rows.append({
                "clients": n, "requests": len(results), "errors": sum(not ok for _, ok in results),
                "seconds": round(wall, 3), "requests_per_s": round(len(latencies) / wall, 2),
                "p50_ms": round(_percentile(latencies, 0.5) * 1000, 1) if latencies else None,
                "p95_ms": round(_percentile(latencies, 0.95) * 1000, 1) if latencies else None,
                "mean_ms": round(statistics.fmean(latencies) * 1000, 1) if latencies else None,
            })
    import torch

    result = {
        "settings": {"model": registry.model_name, "task": loaded.name, "skill": skill.name, "shots": shots,
                     "seed": seed, "max_tokens": max_tokens, "requests_per_level": requests,
                     "clients": list(clients), "server": "create_app on BackgroundServer (one model thread)"},
        "memory": {"source": info.source, "seconds": round(info.seconds, 3), "original_tokens": memory.original_length,
                   "kept_ratio": memory.kept_ratio},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "device": str(registry.lm.device)},
        "rows": rows,
    }
    if out is not None:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        (path / "serving.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def markdown(result: dict[str, Any]) -> str:
    """The rows as a Markdown table."""
    lines = ["| clients | requests | requests/s | p50 ms | p95 ms | mean ms | errors |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['clients']} | {r['requests']} | {r['requests_per_s']} | {r['p50_ms']} | {r['p95_ms']} | "
                     f"{r['mean_ms']} | {r['errors']} |")
    return "\n".join(lines) + "\n"
