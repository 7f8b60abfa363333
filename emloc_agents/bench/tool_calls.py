"""Does a model call the right tool, with the right arguments, only when it should?

Held-out requests (``emloc_agents/data/tool_requests.json``): some need one of four tools, some need
none. Each model answers each request once, greedily, under ``bind_tools(TOOLS)`` with
``tool_choice="auto"`` (the model decides) and, for the requests that need a tool, also under
``tool_choice="any"`` (a call is forced: is it the right one?). Arguments count as right when every
expected value matches (numbers equal; strings: one of the accepted spellings is contained,
case-insensitively).

    python -m emloc_agents.bench.tool_calls --models qwen2.5-coder-0.5b,smollm2-135m,gemma-3-270m --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from langchain_core.messages import HumanMessage
from langchain_core.tools import tool


@tool
def get_weather(location: str) -> str:
    """Get the current weather at a location."""
    return "sunny, 21 C"


@tool
def multiply(a: float, b: float) -> float:
    """Multiply two numbers."""
    return a * b


@tool
def convert_currency(amount: float, from_currency: str, to_currency: str) -> str:
    """Convert an amount of money from one currency to another."""
    return f"{amount} {from_currency} = ? {to_currency}"


@tool
def set_timer(minutes: int) -> str:
    """Start a countdown timer for a number of minutes."""
    return f"timer set for {minutes} minutes"


TOOLS = [get_weather, multiply, convert_currency, set_timer]


def load_requests() -> list[dict[str, Any]]:
    return json.loads(resources.files("emloc_agents.data").joinpath("tool_requests.json").read_text())


def args_match(expected: dict[str, Any], actual: dict[str, Any], unordered: Sequence[str] = ()) -> bool:
    """Every expected argument matches: numbers equal, strings by any accepted spelling (a list);
    ``unordered`` names arguments that may come in either order (a × b)."""
    if unordered:
        want = sorted(float(expected[k]) for k in unordered)
        try:
            ordered = sorted(float(actual.get(k)) for k in unordered)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False
        if want != ordered:
            return False
    for key, value in expected.items():
        if key in unordered:
            continue
        got = actual.get(key)
        if isinstance(value, list):
            if not isinstance(got, str) or not any(v.lower() in got.lower() for v in value):
                return False
        elif isinstance(value, int | float) and not isinstance(value, bool):
            try:
                if float(got) != float(value):  # type: ignore[arg-type]
                    return False
            except (TypeError, ValueError):
                return False
        elif got != value:
            return False
    return True


def evaluate(chat: Any, requests: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Scores of one chat model on the requests, plus every reply (for reading)."""
    auto = chat.bind_tools(TOOLS)
    forced = chat.bind_tools(TOOLS, tool_choice="any")
    need = [r for r in requests if r["tool"]]
    none = [r for r in requests if not r["tool"]]
    rows, t0 = [], time.perf_counter()
    counts = {"calls": 0, "right_tool": 0, "right_args": 0, "false_calls": 0, "forced_right_tool": 0,
              "forced_right_args": 0, "several_calls": 0}
    for r in requests:
        msg = auto.invoke([HumanMessage(r["request"])])
        calls = [{"name": c["name"], "args": c["args"]} for c in msg.tool_calls]
        row = {"request": r["request"], "expected": r["tool"], "auto_calls": calls, "auto_text": msg.content}
        if r["tool"]:
            if calls:
                counts["calls"] += 1
                counts["several_calls"] += len(calls) > 1
                first = calls[0]
                if first["name"] == r["tool"]:
                    counts["right_tool"] += 1
                    counts["right_args"] += args_match(r["args"], first["args"], r.get("unordered", ()))
            f = forced.invoke([HumanMessage(r["request"])])
            fc = f.tool_calls[0] if f.tool_calls else None
            row["forced_call"] = {"name": fc["name"], "args": fc["args"]} if fc else None
            if fc is not None and fc["name"] == r["tool"]:
                counts["forced_right_tool"] += 1
                counts["forced_right_args"] += args_match(r["args"], fc["args"], r.get("unordered", ()))
        else:
            counts["false_calls"] += bool(calls)
        rows.append(row)
    return {"need_tool": len(need), "need_none": len(none), **counts, "seconds": round(time.perf_counter() - t0, 1),
            "replies": rows}


def markdown(results: dict[str, dict[str, Any]]) -> str:
    head = ("| model | auto: calls on need-tool | right tool | right arguments | false calls on no-tool "
            "| forced: right tool | right arguments |\n|---|---|---|---|---|---|---|\n")
    lines = []
    for name, r in results.items():
        n, m = r["need_tool"], r["need_none"]
        lines.append(f"| {name} | {r['calls']}/{n} | {r['right_tool']}/{n} | {r['right_args']}/{n} | "
                     f"{r['false_calls']}/{m} | {r['forced_right_tool']}/{n} | {r['forced_right_args']}/{n} |")
    return head + "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    from ..chat_model import EMLoCChatModel

    ap = argparse.ArgumentParser(prog="python -m emloc_agents.bench.tool_calls", description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="qwen2.5-coder-0.5b,smollm2-135m,gemma-3-270m")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--limit", type=int, default=None, help="first N requests only (a smoke run)")
    args = ap.parse_args(argv)
    requests = load_requests()[: args.limit]
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.models.split(","):
        chat = EMLoCChatModel(model=name, max_tokens=48, json_max_tokens=160, json_max_string_chars=48)
        results[name] = evaluate(chat, requests)
        print(markdown({name: results[name]}), file=sys.stderr)
        (args.out / "tool_calls.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    (args.out / "tool_calls.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
