"""Choose the agent system prompt on requests that are not in the agent study.

Small tool callers call a tool for nearly every request unless told when not to, and what they do
depends on the prompt's wording. This runs candidate system prompts through ``create_agent`` on a
development set of 14 requests (none of them in ``emloc_agents/data/agent_requests.json``) and writes
one table row per prompt; the study then measures the chosen prompt once, on its own request set.

    python scripts/agent_prompt_search.py --model qwen2.5-coder-1.5b --skill-model smollm2-135m --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from emloc_agents.bench.agents import markdown, run_agents

DEV_REQUESTS = [
    {"request": "What is the freezing point of water in Fahrenheit?", "tool": None, "answer": ["32"]},
    {"request": "Who was the first person to walk on the moon?", "tool": None, "answer": ["Armstrong"]},
    {"request": "Translate 'good night' into French.", "tool": None, "answer": ["bonne nuit"]},
    {"request": "How many continents are there?", "tool": None, "answer": ["7", "seven"]},
    {"request": "Good evening!", "tool": None, "answer": ["evening", "hello", "hi"]},
    {"request": "What is the square root of 81?", "tool": None, "answer": ["9", "nine"]},
    {"request": "Which animal is known as the king of the jungle?", "tool": None, "answer": ["lion"]},
    {"request": "Was this review positive or negative? \"an utterly charming , funny little film .\"",
     "tool": "sentiment", "input": "an utterly charming , funny little film .", "gold": "positive"},
    {"request": "Classify the sentiment of: 'a tedious , joyless exercise in style .'",
     "tool": "sentiment", "input": "a tedious , joyless exercise in style .", "gold": "negative"},
    {"request": "What kind of answer does this question expect: 'What is the population of Brazil ?'",
     "tool": "question_type", "input": "What is the population of Brazil ?", "gold": "number"},
    {"request": "Which news topic is this headline: 'Stocks slide as oil prices climb to a new high.'",
     "tool": "news_topic", "input": "Stocks slide as oil prices climb to a new high.", "gold": "business"},
    {"request": "What is 9 times 11?", "tool": "multiply", "args": {"a": 9, "b": 11}, "answer": ["99"]},
    {"request": "Is it sunny in Lima right now?", "tool": "get_weather", "args": {"location": ["Lima"]},
     "answer": ["sunny"]},
    {"request": "Multiply 2.5 by 4.", "tool": "multiply", "args": {"a": 2.5, "b": 4}, "answer": ["10"]},
]

CANDIDATES = {
    "plain": (  # the first agent prompt
        "You are a helpful assistant. When one of your tools fits the user's request, call it once with the "
        "user's text. When a tool response arrives, answer the user in one short sentence that gives the "
        "tool's result. When no tool fits, answer the user directly."),
    "when-not": (
        "You are a helpful assistant. First decide whether one of your tools does exactly what the user "
        "asks. If it does, call it once with the user's text; when the tool response arrives, answer in one "
        "short sentence that gives the tool's result. If no tool does exactly that (general knowledge, "
        "greetings, translation, writing), do not call any tool: answer directly from what you know, in one "
        "short sentence."),
    "when-not-examples": (  # emloc_agents.tools.AGENT_SYSTEM_PROMPT
        "You are a helpful assistant. You have tools, but most questions need none. Call a tool only when the "
        "request asks for exactly what the tool's description says it does: call it once with the user's text, "
        "and when the tool response arrives, answer in one short sentence that gives the tool's result. "
        "Otherwise answer directly in one short sentence, without a tool. For example, 'What is the capital of "
        "Italy?' is answered 'The capital of Italy is Rome.' and 'Say hi.' is answered 'Hi!', with no tool."),
    "tools-first-examples": (
        "You are a helpful assistant with tools. When the user asks for what one of your tools does, call that "
        "tool once with the user's text, even if you think you know the answer: the tool's answer is the one to "
        "give. When the tool response arrives, answer in one short sentence that gives the tool's result. When "
        "none of your tools does what the user asks, answer directly in one short sentence, without a tool. For "
        "example, 'What is the capital of Italy?' is answered 'The capital of Italy is Rome.' and 'Say hi.' is "
        "answered 'Hi!', with no tool."),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--skill-model", default="smollm2-135m")
    ap.add_argument("--shots", type=int, default=32)
    ap.add_argument("--prompts", default=",".join(CANDIDATES))
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    results = []
    for name in args.prompts.split(","):
        r = run_agents(args.model, args.skill_model, args.shots, out=Path(args.out) / name,
                       cache_dir=args.cache_dir, system_prompt=CANDIDATES[name], requests=DEV_REQUESTS)
        r["prompt"] = name
        results.append(r)
        print(name, json.dumps(r["summary"]), flush=True)
    table = markdown(results).splitlines()
    rows = [f"| {r['prompt']} " + line for r, line in zip(results, table[2:], strict=True)]
    text = "\n".join(["| prompt " + table[0], "|---" + table[1], *rows]) + "\n"
    (Path(args.out) / "prompts.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
