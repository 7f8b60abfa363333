"""The few-shot tool selector's first decisions alone, without running the agent: for each request of a
set, the tool (or none) that ``FewShotToolSelectorMiddleware`` chooses on ``--model``, against the tool
the request needs. One selector answer per request (about a second on the 1.5B), so it compares
selector models cheaply; ``emloc bench --agents --tool-selector`` measures the whole agent.

    python scripts/tool_selector_choices.py --model qwen2.5-coder-1.5b --requests study heldout --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from emloc_agents.bench.agents import agent_tools, load_requests, skill_registry
from emloc_agents.chat_model import EMLoCChatModel
from emloc_agents.middleware import NO_TOOL, FewShotToolSelectorMiddleware, example_requests
from emloc_agents.registry import MemoryRegistry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b", help="the model that answers the selector")
    ap.add_argument("--skill-model", default="smollm2-135m", help="the skills' model (their tools are offered)")
    ap.add_argument("--requests", nargs="+", default=["study", "heldout"], help="request sets (names or files)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    skills = skill_registry(args.skill_model, 32)
    tools = agent_tools(skills, EMLoCChatModel(registry=skills))
    chat = EMLoCChatModel(registry=MemoryRegistry(model=args.model), max_tokens=16)
    selector = FewShotToolSelectorMiddleware(chat, example_requests())
    t0 = time.perf_counter()
    _, info = chat.get_registry().get_with_info(selector.skill_for(tools))
    result = {"model": args.model, "selector_memory": {"source": info.source, "tokens": info.compressed_tokens,
                                                      "seconds": round(time.perf_counter() - t0, 1)}, "sets": {}}
    for which in args.requests:
        rows = []
        for req in load_requests(which):
            t = time.perf_counter()
            choice = selector.choose(req["request"], tools)
            rows.append({"request": req["request"], "want": req["tool"] or NO_TOOL, "chose": choice,
                         "seconds": round(time.perf_counter() - t, 2)})
        right = sum(r["want"] == r["chose"] for r in rows)
        result["sets"][which] = {"right": right, "n": len(rows), "rows": rows}
        print(f"{which}: {right} / {len(rows)} first decisions right", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "choices.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
