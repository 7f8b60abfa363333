"""``emloc bench --serve``: requests/s and latency of the server, at several numbers of concurrent clients.

The server (``create_app`` on ``BackgroundServer``, real HTTP on a free port) answers one skill's
chat completions; each level sends the same ``requests`` queries (the task's test inputs) from
``clients`` threads at once. The skill is compressed (or loaded) before any timing. The server runs one
model thread; requests that wait for it together are decoded as one batch (up to ``max_batch``), so
requests/s can grow with the number of clients. Each ``max_batch`` setting gets its own server on the
same model: ``max_batch=1`` (one request at a time) is the baseline the batching gain is read against.
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

WARM_UP = 8
"""Requests each server answers, one at a time, before its timing. The first server measured in a
process still runs ~1.5x slower at one client than the next (SmolLM2, 2026-12-06, either order):
compare settings at 4 and more clients (docs/serving.md)."""


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
                      max_tokens: int = 4, max_batch: tuple[int, ...] = (1, 16), device: str = "auto",
                      cache_dir: str | None = None, out: str | Path | None = None) -> dict[str, Any]:
    """Measure the server at each ``max_batch`` and number of ``clients``; returns (and writes to
    ``out/serving.json``) the settings, the machine and one row per level: requests/s, p50/p95/mean
    latency, errors, and the mean number of requests answered together."""

    from ..chat_model import EMLoCChatModel
    from ..registry import MemoryRegistry
    from ..tasks import Task
    from .app import create_app

    if not clients or min(clients) < 1 or requests < 1:
        raise ValueError("clients and requests must be >= 1")
    if not max_batch or min(max_batch) < 1:
        raise ValueError("max_batch must be >= 1")
    loaded = Task.load(task)
    skill = loaded.skill(shots, seed, name=skill_name)
    if not loaded.test:
        raise ValueError(f"task {loaded.name} has no test inputs to send")
    queries = [loaded.format_input(loaded.test[i % len(loaded.test)].text) for i in range(requests)]
    registry = MemoryRegistry(model=model, device=device, cache_dir=cache_dir)
    registry.add(skill)
    memory, info = registry.get_with_info(skill)
    chat = EMLoCChatModel(registry=registry, max_tokens=max_tokens)
    rows = []
    for batch in max_batch:
        rows += _measure(create_app(chat, max_queue=max(clients), max_batch=batch), batch,
                         f"{registry.model_name}:{skill.name}", queries, clients, max_tokens)
    import torch

    result = {
        "settings": {"model": registry.model_name, "task": loaded.name, "skill": skill.name, "shots": shots,
                     "seed": seed, "max_tokens": max_tokens, "requests_per_level": requests,
                     "clients": list(clients), "max_batch": list(max_batch),
                     "server": "create_app on BackgroundServer (one model thread)"},
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


def _measure(app: Any, batch: int, model: str, queries: list[str], clients: tuple[int, ...],
             max_tokens: int) -> list[dict[str, Any]]:
    """One server's rows: the queries sent by each number of clients in turn."""
    import httpx

    from .runner import BackgroundServer

    rows = []
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=600,
                                                   limits=httpx.Limits(max_connections=max(clients))) as http:
        body = {"model": model, "max_tokens": max_tokens}

        def ask(query: str) -> tuple[float, bool]:
            t0 = time.perf_counter()
            reply = http.post("/v1/chat/completions", json=body | {"messages": [{"role": "user", "content": query}]})
            return time.perf_counter() - t0, reply.status_code == 200

        for q in queries[:WARM_UP]:  # the first requests pay one-off costs (allocations, the prompt cache)
            ask(q)
        for n in clients:
            before = http.get("/health").json()
            t0 = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                results = list(pool.map(ask, queries))
            wall = time.perf_counter() - t0
            after = http.get("/health").json()
            batches = after["batches"] - before["batches"]
            latencies = [s for s, ok in results if ok]
            rows.append({
                "max_batch": batch, "clients": n, "requests": len(results), "errors": sum(not ok for _, ok in results),
                "seconds": round(wall, 3), "requests_per_s": round(len(latencies) / wall, 2),
                "p50_ms": round(_percentile(latencies, 0.5) * 1000, 1) if latencies else None,
                "p95_ms": round(_percentile(latencies, 0.95) * 1000, 1) if latencies else None,
                "mean_ms": round(statistics.fmean(latencies) * 1000, 1) if latencies else None,
                "mean_batch": round((after["batched_requests"] - before["batched_requests"]) / batches, 2) if batches else None,
            })
    return rows


def markdown(result: dict[str, Any]) -> str:
    """The rows as a Markdown table."""
    lines = ["| max_batch | clients | requests | requests/s | p50 ms | p95 ms | mean ms | mean batch | errors |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['max_batch']} | {r['clients']} | {r['requests']} | {r['requests_per_s']} | {r['p50_ms']} | "
                     f"{r['p95_ms']} | {r['mean_ms']} | {r['mean_batch']} | {r['errors']} |")
    return "\n".join(lines) + "\n"
