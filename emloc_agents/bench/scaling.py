"""Scaling study (``emloc bench --scaling``): how EMLoC's costs grow with the demonstrations.

One row of ``SCALING_FIELDS`` per model, task and shot count (one seed):

- ``peak_rss_compress_mb`` / ``peak_rss_full_prefill_mb``: the peak RSS that chunk-wise EMLoC
  compression (``compress(lm, skill, EMLoCConfig())``) and one full prefill of the same tokens (a
  plain transformers forward into a ``DynamicCache``, which keeps the whole KV) add on top of the
  loaded model. Each runs in a fresh worker process after a one-demonstration warm-up of the same
  kind; ``rss.PeakRSS`` says how and why.
- ``cold_s`` / ``warm_s``: the first ``MemoryRegistry.get`` on an empty cache dir (compresses,
  serialises, stores; its compression is the one metered above) vs ``get`` from a new registry
  instance on the same dir (loads and validates from diskcache; median of ``WARM_REPEATS``
  instances). Model fingerprint and store are opened before either is timed. The file was just
  written, so the warm read comes from the OS page cache, as for a server that compressed it.
- ``compress_over_prefill``: ``compress_s / prefill_s``, the search's cost in plain prefills.
- ``decode_ms_memory`` / ``decode_ms_full_prefix``: milliseconds per decoded token (after the
  first, ``DECODE_TOKENS`` greedy tokens, end-of-sequence held back) of a test query on the memory,
  and of transformers' ``generate`` on the whole demonstrations + the same query (``timing.py``).
- ``disk_bytes``: the bytes stored for the memory (safetensors + JSON header, as the registry
  writes them); ``memory_kv_bytes``: its K/V tensors alone; ``full_kv_bytes``: the fp16 K/V of
  all the tokens (``full_kv_bytes()``), the size a full cache of the demonstrations would have.

Outputs in ``out``: ``scaling.json``, ``scaling.csv``, ``config.json`` (with the code state, since
the numbers move with the search code) and the PNGs of ``plots.make_scaling_plots``. Workers
answer with one JSON line on stdout; nothing is unpickled.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import EMLoCConfig
from ..engine.facts import ModelFacts
from ..registry import MemoryRegistry
from ..skills import Skill
from ..tasks import Task, task_path
from .plots import make_scaling_plots
from .rss import PeakRSS
from .run import BenchError, finish_run, load_tasks, machine_info
from .timing import engine_decode_per_token, hf_decode_per_token, plain_prefill, timed

SCALING_FIELDS = [
    "task", "model", "shots", "seed", "press", "original_tokens", "memory_tokens", "kept_ratio", "compress_s",
    "prefill_s", "compress_over_prefill", "decode_ms_memory", "decode_ms_full_prefix", "peak_rss_compress_mb", "peak_rss_full_prefill_mb", "cold_s", "warm_s", "disk_bytes",
    "full_kv_bytes", "memory_kv_bytes", "baseline_rss_mb", "rss_method",
]
WARM_REPEATS = 3
WARMUP_DEMOS = 1  # small, so the warm-up leaves little free memory in the allocator to hide the peak
_MARK = "EMLOC_SCALING_RESULT "
_WORKER = "import sys; from emloc_agents.bench.scaling import worker_main; sys.exit(worker_main(sys.argv[1:]))"


def full_kv_bytes(facts: ModelFacts, tokens: int, bytes_per_value: int = 2) -> int:
    """Bytes of the uncompressed K/V of ``tokens`` tokens (fp16 by default): per layer 2 (K, V) x
    kv_heads x head_dim x bytes x the tokens it holds. A sliding-window layer holds at most
    ``window - 1`` (all a later token can see; the memory and transformers' sliding cache keep that)."""
    per_token = 2 * facts.num_kv_heads * facts.head_dim * bytes_per_value
    return sum(per_token * (min(tokens, w - 1) if w else tokens) for w in facts.windows)


def demo_ids(lm: Any, skill: Skill) -> list[int]:
    """The demonstrations as one token sequence: what ``full-icl`` prefills (= the memory's
    ``original_length``)."""
    return lm.renderer("auto").render(skill.instruction, skill.demonstrations).ids


@torch.inference_mode()
def full_prefill(lm: Any, ids: Sequence[int]) -> float:
    """Seconds of one forward of ``ids`` into a ``DynamicCache`` (the full KV stays alive until return).

    The model as loaded here: outside a memory its attention hook is inert (SDPA, causal mask),
    and only the last position's logits are computed, as for the first token of an answer."""
    return timed(lambda: plain_prefill(lm, ids), lm.device)[0]


class _MeteredRegistry(MemoryRegistry):
    """A registry whose compression (inside a cold ``get``) is RSS-metered, and nothing else."""

    rss: PeakRSS | None = None

    def _compress(self, skill: Skill) -> Any:
        with PeakRSS(collect=False) as self.rss:  # gc ran before the timed get
            return super()._compress(skill)


# ---- worker side (a fresh process per measurement) ------------------------------------------------


def query_ids(lm: Any, task: Task) -> list[int]:
    """A test input of the task as the text after the demonstrations (for decode timings)."""
    return lm.tokenizer(task.format_input(task.test[0].text), add_special_tokens=False)["input_ids"]


def _compress_worker(lm: Any, skill: Skill, cache_dir: Path, query: list[int],
                     config: EMLoCConfig) -> dict[str, Any]:
    from ..engine import compress
    from ..store import DiskCacheStore

    compress(lm, skill.model_copy(update={"demonstrations": skill.demonstrations[:WARMUP_DEMOS]}), config)
    lm.fingerprint()
    cold = _MeteredRegistry(lm, store=DiskCacheStore(cache_dir), config=config)
    gc.collect()
    mem = cold.get(skill)
    info = cold.last_info[skill.name]
    if info.source != "compressed" or cold.rss is None:
        raise RuntimeError(f"cold get did not compress (source {info.source})")
    warm, stored = [], None
    for _ in range(WARM_REPEATS):
        reg = MemoryRegistry(lm, store=DiskCacheStore(cache_dir), config=config)
        reg.get(skill)
        if reg.last_info[skill.name].source != "store":
            raise RuntimeError(f"warm get did not load from the store ({reg.last_info[skill.name].source})")
        warm.append(reg.last_info[skill.name].seconds)
        stored = reg.store.mget([reg.key(skill)])[0]
    return {
        "press": mem.stats.get("press"), "original_tokens": mem.original_length,
        "memory_tokens": mem.memory_tokens / mem.num_layers,
        "kept_ratio": mem.kept_ratio, "compress_s": float(mem.stats["compress_s"]), "cold_s": info.seconds,
        "warm_s": statistics.median(warm), "disk_bytes": len(stored or b""), "memory_kv_bytes": mem.nbytes(),
        "peak_rss_mb": cold.rss.delta_mb, "baseline_rss_mb": cold.rss.baseline_mb, "rss_method": cold.rss.method,
        "decode_ms_memory": 1e3 * engine_decode_per_token(lm, query, mem),
    }


def _prefill_worker(lm: Any, skill: Skill, query: list[int]) -> dict[str, Any]:
    full_prefill(lm, demo_ids(lm, skill.model_copy(update={"demonstrations": skill.demonstrations[:WARMUP_DEMOS]})))
    ids = demo_ids(lm, skill)
    with PeakRSS() as rss:
        seconds = full_prefill(lm, ids)
    return {"tokens": len(ids), "prefill_s": seconds, "peak_rss_mb": rss.delta_mb, "rss_method": rss.method,
            "decode_ms_full_prefix": 1e3 * hf_decode_per_token(lm, ids + query)}


def worker_main(argv: Sequence[str]) -> int:
    """Entry of a worker process: one JSON spec in, one marked JSON line out."""
    from ..models.loader import load_model

    spec = json.loads(argv[0])
    lm = load_model(spec["model"], device=spec.get("device", "auto"))
    task = Task.load(spec["task"])
    skill = task.skill(spec["shots"], spec["seed"])
    if spec["op"] == "compress":
        result = _compress_worker(lm, skill, Path(spec["cache_dir"]), query_ids(lm, task),
                                  EMLoCConfig(compression=spec.get("compression", "auto")))
    else:
        result = _prefill_worker(lm, skill, query_ids(lm, task))
    print(_MARK + json.dumps(result), flush=True)
    return 0


def _run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", _WORKER, json.dumps(spec)], capture_output=True, text=True,
                          env=os.environ.copy(), check=False)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}, no output"])[-1]
    raise BenchError(f"scaling worker ({spec['op']}, {spec['shots']} shots) failed: {tail}")


# ---- parent side -----------------------------------------------------------------------------------


def code_state() -> dict[str, Any]:
    """Which code measured: git commit, local changes, and a hash of the package's sources (workers
    import the code when they start, so a source edit during a run would mix versions)."""
    package = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(package.rglob("*.py")):
        h.update(f.relative_to(package).as_posix().encode() + b"\0" + f.read_bytes())
    state: dict[str, Any] = {"sources_sha256": h.hexdigest()[:16], "git_commit": None, "git_dirty": None}
    try:
        git = ["git", "-C", str(package.parent)]
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run([*git, "status", "--porcelain", "--", package.name], capture_output=True, text=True,
                               timeout=10, check=True)
        state.update(git_commit=head.stdout.strip(), git_dirty=bool(dirty.stdout.strip()))
    except (OSError, subprocess.SubprocessError):
        pass  # not a git checkout (installed package)
    return state



def write_scaling(rows: list[dict], out: Path) -> None:
    (out / "scaling.json").write_text(json.dumps(rows, indent=1))
    with (out / "scaling.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=SCALING_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)


def run_scaling(
    tasks: Sequence[str | Path],
    model: str = "default",
    shots: Sequence[int] = (16,),
    seed: int = 0,
    out: str | Path = "results/scaling",
    *,
    progress: bool = True,
    plots: bool = True,
    device: str = "auto",
    compression: str = "auto",
) -> list[dict]:
    """Run the scaling study (module docstring); ``model`` is a ``load_model`` name (workers load it too)."""
    from ..models.loader import load_model, resolve_device

    if not shots or any(s < 1 for s in shots):
        raise BenchError("shots must be positive integers")
    try:
        resolve_device(device)
    except ValueError as e:
        raise BenchError(str(e)) from None
    folders = [task_path(t).resolve() for t in tasks]  # names (bundled tasks) or folders
    loaded = load_tasks(folders)
    lm = load_model(model, device=device)
    limit = lm.facts.max_positions
    plan = []
    for task, folder in zip(loaded, folders, strict=True):  # check every point before any work
        for n in shots:
            if n > len(task.pool):
                raise BenchError(f"task {task.name}: {n} shots asked, pool has {len(task.pool)}")
            tokens = len(demo_ids(lm, task.skill(n, seed)))
            if limit and tokens >= limit:
                raise BenchError(f"task {task.name}: {n} shots are {tokens} tokens; {lm.name} has {limit} positions")
            plan.append((task, folder, n, tokens))
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "study": "scaling", "tasks": [str(f) for f in folders], "model": model, "resolved_model": lm.name, "device": str(lm.device),
        "shots": list(shots), "seed": seed, "out": str(out), "warm_repeats": WARM_REPEATS,
        "warmup_demos": WARMUP_DEMOS, "emloc_config": EMLoCConfig(compression=compression).model_dump(mode="json"), "code": code_state(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine_info(),
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    rows: list[dict] = []
    for task, folder, n, tokens in plan:
        spec = {"model": model, "task": str(folder), "shots": n, "seed": seed, "device": device,
                "compression": compression}
        if progress:
            print(f"emloc bench: scaling {task.name} {n} shots ({tokens} tokens)", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="emloc-scaling-") as tmp:
            c = _run_worker({**spec, "op": "compress", "cache_dir": tmp})
        p = _run_worker({**spec, "op": "prefill"})
        if c["original_tokens"] != p["tokens"]:
            raise BenchError(f"memory holds {c['original_tokens']} tokens but the full prefill had {p['tokens']}")
        rows.append({
            "task": task.name, "model": lm.name, "shots": n, "seed": seed,
            "press": c["press"], "original_tokens": c["original_tokens"], "memory_tokens": c["memory_tokens"],
            "kept_ratio": c["kept_ratio"], "compress_s": c["compress_s"], "prefill_s": p["prefill_s"],
            "compress_over_prefill": c["compress_s"] / p["prefill_s"], "decode_ms_memory": c["decode_ms_memory"],
            "decode_ms_full_prefix": p["decode_ms_full_prefix"],
            "peak_rss_compress_mb": c["peak_rss_mb"], "peak_rss_full_prefill_mb": p["peak_rss_mb"],
            "cold_s": c["cold_s"], "warm_s": c["warm_s"], "disk_bytes": c["disk_bytes"],
            "full_kv_bytes": full_kv_bytes(lm.facts, c["original_tokens"]), "memory_kv_bytes": c["memory_kv_bytes"],
            "baseline_rss_mb": c["baseline_rss_mb"],
            "rss_method": c["rss_method"] if c["rss_method"] == p["rss_method"] else f"{c['rss_method']}/{p['rss_method']}",
        })
        write_scaling(rows, out)  # partial results survive an interrupted run
    config["code_changed_during_run"] = code_state()["sources_sha256"] != config["code"]["sources_sha256"]
    if config["code_changed_during_run"]:
        print("emloc bench: warning: emloc_agents sources changed during the run; rows may mix versions",
              file=sys.stderr)
    finish_run(config, rows, out, make_scaling_plots if plots else None)
    return rows
