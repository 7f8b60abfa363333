"""Agents end to end: LangChain's own ``create_agent`` with skills as tools, on a fixed request set.

Three skills from the bundled tasks (``sentiment``: SST-2, ``question_type``: TREC, ``news_topic``:
AG News), two ordinary tools (``multiply``, ``get_weather``) and requests that need no tool
(``emloc_agents/data/agent_requests.json``). Each request runs once, greedily, through
``create_agent(chat, tools, system_prompt=AGENT_SYSTEM_PROMPT)`` (``emloc_agents.tools``). Per request: the right tool
called (none where none is needed), its arguments, the right final answer (a skill request's final
message states what the skill answered; a tool request's, the tool's result; a no-tool request's, the
expected words), model steps, loops (a call repeated after its result), calls written as text that
could not be read (``invalid_tool_calls``). End to end right = right tool, right answer, no loop, at
most ``MAX_STEPS`` model steps.

The skills may run on another model than the agent (``skill_model``): a small model behind the
skills and a bigger tool caller in front is a common shape, and it keeps compression cheap here.

    emloc bench --agents --model qwen2.5-coder-1.5b --skill-model smollm2-135m --shots 32 --out DIR
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.tools import BaseTool, tool
from tqdm.auto import tqdm

from ..chat_model import EMLoCChatModel
from ..registry import MemoryRegistry
from ..tasks import Task
from ..tools import AGENT_SYSTEM_PROMPT

SKILL_TASKS = {"sentiment": "sst2", "question_type": "trec", "news_topic": "agnews"}
MAX_STEPS = 4
STEP_LIMIT = 6  # runs are cut after this many model steps (counted as past MAX_STEPS)


@tool
def multiply(a: float, b: float) -> float:
    """Multiply two numbers."""
    return a * b


@tool
def get_weather(location: str) -> str:
    """Get the current weather at a location."""
    return f"sunny, 21 C in {location}"


REQUEST_SETS = {"study": "agent_requests.json", "heldout": "agent_requests_heldout.json",
                "heldout2": "agent_requests_heldout2.json"}
"""The bundled request sets: ``study`` (50 requests), ``heldout`` and ``heldout2`` (40 each, written after
it by writers who saw neither the study's phrasings nor the tool selector's examples; exact repeats of
those were then replaced). Skill texts are test items, from index 300 on in ``heldout``."""


def load_requests(which: str = "study") -> list[dict[str, Any]]:
    """A bundled request set by name (``REQUEST_SETS``) or a JSON file of requests in the same format."""
    if which in REQUEST_SETS:
        return json.loads(resources.files("emloc_agents.data").joinpath(REQUEST_SETS[which]).read_text())
    return json.loads(Path(which).read_text())


def skill_registry(model: str, shots: int, seed: int = 0, cache_dir: str | Path | None = None) -> MemoryRegistry:
    """The three skills of the request set, ``shots`` demonstrations each, on ``model``."""
    registry = MemoryRegistry(model=model, cache_dir=cache_dir)
    for name, task in SKILL_TASKS.items():
        registry.add(Task.load(task).skill(shots, seed, name=name))
    return registry


def agent_tools(registry: MemoryRegistry, skill_chat: EMLoCChatModel | None = None,
                return_direct: bool = False) -> list[BaseTool]:
    """The skill tools (``return_direct``: an agent ends on a skill's answer), then the two plain tools."""
    skill_tools = registry.as_tools(skill_chat or EMLoCChatModel(registry=registry), return_direct=return_direct)
    return [*skill_tools, multiply, get_weather]


def _words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9.]+", text.lower()))


def _contains(text: str, options: Sequence[str]) -> bool:
    """Whether ``text`` holds one of ``options`` as a whole word (or number)."""
    return any(re.search(rf"(?<![a-z0-9.]){re.escape(o.lower())}(?![a-z0-9])", text.lower()) for o in options if o)


def _args_right(req: dict[str, Any], args: dict[str, Any]) -> bool:
    if req["tool"] in SKILL_TASKS:
        return _words(req["input"])[:24] in _words(str(args.get("input", "")))
    expected = req.get("args", {})
    if req["tool"] == "multiply":
        try:
            return sorted(float(args[k]) for k in ("a", "b")) == sorted(float(expected[k]) for k in ("a", "b"))
        except (KeyError, TypeError, ValueError):
            return False
    return all(_contains(str(args.get(k, "")), v) for k, v in expected.items())


def score(req: dict[str, Any], messages: Sequence[BaseMessage], error: str | None = None) -> dict[str, Any]:
    """One request's outcome from the agent's messages (the request itself first)."""
    ais = [m for m in messages if isinstance(m, AIMessage)]
    calls = [(c["name"], c["args"]) for m in ais for c in m.tool_calls]
    results = {m.tool_call_id: str(m.content) for m in messages if isinstance(m, ToolMessage)}
    first_result = next((results.get(c.get("id") or "", "") for m in ais for c in m.tool_calls
                         if c["name"] == req["tool"]), None)
    if error is not None or not messages:
        final = ""
    elif isinstance(messages[-1], ToolMessage):  # a return_direct tool ended the turn: its result is the answer
        final = str(messages[-1].content)
    else:
        final = str(ais[-1].content) if ais and not ais[-1].tool_calls else ""
    loops = sum(1 for i, c in enumerate(calls) if c in calls[:i])
    want = req["tool"]
    right_tool = (not calls and not any(m.invalid_tool_calls for m in ais)) if want is None else (
        bool(calls) and calls[0][0] == want)
    answer = ([first_result] if first_result else []) if want in SKILL_TASKS else req["answer"]
    right_answer = bool(answer) and _contains(final, answer)
    steps = len(ais)
    return {
        "request": req["request"], "tool": want, "calls": [{"name": n, "args": a} for n, a in calls],
        "invalid_calls": sum(len(m.invalid_tool_calls) for m in ais), "skill_reply": first_result,
        "gold": req.get("gold"), "final": final, "steps": steps, "loops": loops, "error": error,
        "right_tool": right_tool, "right_args": bool(calls) and want is not None and _args_right(req, calls[0][1]),
        "right_answer": right_answer,
        "right": right_tool and right_answer and loops == 0 and steps <= MAX_STEPS and error is None,
    }


def run_request(agent: Any, req: dict[str, Any]) -> dict[str, Any]:
    from langgraph.errors import GraphRecursionError

    t0 = time.perf_counter()
    messages: list[BaseMessage] = []
    error = None
    try:
        # each model step is a model node and, after a call, a tools node; the state is followed step
        # by step so that a run cut at the limit still shows what it did
        for state in agent.stream({"messages": [("user", req["request"])]}, {"recursion_limit": 2 * STEP_LIMIT},
                                  stream_mode="values"):
            messages = state["messages"]
    except GraphRecursionError:
        error = f"more than {STEP_LIMIT} model steps"
    row = score(req, messages, error)
    if error is not None:
        row["steps"] = STEP_LIMIT + 1
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    def share(xs: Sequence[bool]) -> float | None:
        return round(sum(xs) / len(xs), 3) if xs else None

    needs = [r for r in rows if r["tool"] is not None]
    skills = [r for r in rows if r["tool"] in SKILL_TASKS and r["skill_reply"]]
    return {
        "n": len(rows),
        "right": share([r["right"] for r in rows]),
        "right_tool": share([r["right_tool"] for r in rows]),
        "right_args": share([r["right_args"] for r in needs]),
        "right_answer": share([r["right_answer"] for r in rows]),
        "no_tool_answered_without": share([r["right_tool"] for r in rows if r["tool"] is None]),
        "mean_steps": round(sum(r["steps"] for r in rows) / max(len(rows), 1), 2),
        "past_max_steps": sum(r["steps"] > MAX_STEPS for r in rows),
        "with_loops": sum(r["loops"] > 0 for r in rows),
        "invalid_calls": sum(r["invalid_calls"] for r in rows),
        "skill_accuracy": share([r["skill_reply"] == r["gold"] for r in skills]),
        "seconds_per_request": round(sum(r["seconds"] for r in rows) / max(len(rows), 1), 1),
    }


def run_agents(model: str, skill_model: str | None = None, shots: int = 32, seed: int = 0,
               limit: int | None = None, out: str | Path | None = None,
               cache_dir: str | Path | None = None, system_prompt: str = AGENT_SYSTEM_PROMPT,
               requests: str | Sequence[dict[str, Any]] = "study", tool_selector: bool = False,
               return_direct: bool = False) -> dict[str, Any]:
    """Run a request set (a name or file for ``load_requests``, or the requests themselves) through
    ``create_agent`` on ``model``; write ``agents.json`` (rows and summary) under ``out``.
    ``tool_selector``: each turn's tool (or none) is chosen by ``FewShotToolSelectorMiddleware`` on the agent's model from the package's example
    requests. ``return_direct``: the skill tools end the agent's turn on their answer. Returns ``{"model",
    "skill_model", "shots", "seed", "tool_selector", "return_direct", "requests", "summary", "rows"}``."""
    from langchain.agents import create_agent

    from ..middleware import FewShotToolSelectorMiddleware, example_requests

    registry = skill_registry(skill_model or model, shots, seed, cache_dir)
    same = skill_model in (None, model)
    agent_chat = EMLoCChatModel(registry=registry if same else MemoryRegistry(model=model, cache_dir=cache_dir),
                                max_tokens=128)
    skill_chat = agent_chat if same else EMLoCChatModel(registry=registry, max_tokens=128)
    for skill in registry.skills():
        registry.get(skill)  # compress before timing requests
    tools = agent_tools(registry, skill_chat, return_direct)
    middleware = []
    if tool_selector:
        selector = FewShotToolSelectorMiddleware(agent_chat, example_requests())
        agent_chat.get_registry().get(selector.skill_for(tools))  # compressed before timing, like the skills
        middleware.append(selector)
    agent = create_agent(agent_chat, tools=tools, system_prompt=system_prompt, middleware=middleware)
    rows: list[dict[str, Any]] = []
    setup = {"model": model, "skill_model": skill_model or model, "shots": shots, "seed": seed,
             "tool_selector": tool_selector, "return_direct": return_direct,
             "requests": requests if isinstance(requests, str) else "given"}
    todo = load_requests(requests) if isinstance(requests, str) else list(requests)
    for req in tqdm(todo[:limit], desc=f"agent requests on {model}", unit="request"):
        rows.append(run_request(agent, req))
        if out is not None:  # written after every request: a long run can be read while it goes
            _write(out, rows, setup)
    return _write(out, rows, setup)


def _write(out: str | Path | None, rows: list[dict[str, Any]], setup: dict[str, Any]) -> dict[str, Any]:
    result = {**setup, "summary": summarise(rows), "rows": rows}
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "agents.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    return result


def markdown(results: Sequence[dict[str, Any]]) -> str:
    """One table row per agent model."""
    head = ("| agent model | skills on | n | end to end | right tool | right args | right answer | no tool when "
            "none needed | mean steps | past 4 steps | loops | invalid calls | skill = gold | s/request |")
    lines = [head, "|" + "---|" * 14]
    for r in results:
        s = r["summary"]
        setup = (" + tool selector" if r.get("tool_selector") else "") + (
            ", skills return direct" if r.get("return_direct") else "")
        lines.append(f"| {r['model']}{setup} | {r['skill_model']} ({r['shots']} shots) | {s['n']} | {s['right']} | "
                     f"{s['right_tool']} | {s['right_args']} | {s['right_answer']} | {s['no_tool_answered_without']} | "
                     f"{s['mean_steps']} | {s['past_max_steps']} | {s['with_loops']} | {s['invalid_calls']} | "
                     f"{s['skill_accuracy']} | {s['seconds_per_request']} |")
    return "\n".join(lines) + "\n"
