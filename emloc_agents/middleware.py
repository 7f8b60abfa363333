"""Choose an agent's tool from worked examples: a LangChain agent middleware whose choice is a skill.

A small tool caller decides badly whether a request needs a tool: told to call tools sparingly, it
answers some requests itself that a skill should answer; told otherwise, it calls tools for general
questions. ``FewShotToolSelectorMiddleware`` takes that first decision away from the agent's free
generation. Labelled example requests ("What's the weather in Oslo?" -> ``get_weather``, "Who wrote
Hamlet?" -> no tool) become a skill whose answer is constrained to one tool name or ``none``; its
memory is compressed once like any other skill. At the first model step of each user turn the agent
is then offered only the chosen tool, with the call required, or no tool at all. Later steps (after a
tool result) go to the model unchanged.

    selector = FewShotToolSelectorMiddleware(chat, examples)
    agent = create_agent(chat, tools, middleware=[selector])
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any

from langchain.agents.middleware import AgentMiddleware, ModelRequest, ModelResponse
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool
from langgraph.constants import TAG_NOSTREAM

from .skills import Demonstration, Skill, SkillError

if TYPE_CHECKING:
    from .chat_model import EMLoCChatModel

NO_TOOL = "none"
"""The label of a request that needs no tool."""

# the selector's own call, kept out of an agent's streamed output (as LangChain's LLMToolSelectorMiddleware does)
_INTERNAL: RunnableConfig = {"tags": [TAG_NOSTREAM], "metadata": {"lc_source": "tool_selection"}}


def example_requests() -> list[tuple[str, str | None]]:
    """The package's 51 example requests for the tools of ``emloc bench --agents`` (``sentiment``,
    ``question_type``, ``news_topic``, ``multiply``, ``get_weather``, and none): written for this
    selector, with texts from the tasks' demonstration pools; none is in the agent study's request sets."""
    rows = json.loads(resources.files("emloc_agents.data").joinpath("agent_tool_examples.json").read_text())
    return [(r["request"], r["tool"] if r["tool"] != NO_TOOL else None) for r in rows]


def _first_sentence(text: str, limit: int = 120) -> str:
    line = " ".join(text.split())
    cut = line.find(". ")
    line = line[: cut + 1] if cut >= 0 else line
    return line if len(line) <= limit else line[: limit - 3] + "..."


def tool_choice_skill(examples: Sequence[tuple[str, str | None]], tools: Sequence[BaseTool],
                      name: str = "tool_choice") -> Skill:
    """The skill that names the tool a request needs (``None`` in ``examples``: no tool). Its
    instruction lists the tools with the first sentence of each description; its labels are the
    tools' names and ``none``. Examples of tools not in ``tools`` are left out, so one example set
    serves agents with fewer tools (and middleware that narrows the tools per call)."""
    names = [t.name for t in tools]
    if NO_TOOL in names:
        raise SkillError(f"a tool may not be named {NO_TOOL!r}: it is the selector's 'no tool' answer")
    kept = [(r, t) for r, t in examples if t is None or t in names]
    if not any(t is not None for _, t in kept) or not any(t is None for _, t in kept):
        raise SkillError(f"the tool selector needs example requests for at least one of the tools {names} "
                         "and for requests that need none")
    listing = "\n".join(f"- {t.name}: {_first_sentence(t.description)}" for t in tools)
    return Skill(
        name=name,
        instruction=("Name the one tool a request needs, or none when it is answered without a tool "
                     f"(general knowledge, conversation, writing). The tools:\n{listing}"),
        demonstrations=[Demonstration(input=f"Request: {' '.join(r.split())}\nTool:", output=t or NO_TOOL)
                        for r, t in kept],
        input_template="Request: {input}\nTool:",
        labels=[*names, NO_TOOL],
    )


def _turn_started(messages: Sequence[Any]) -> str | None:
    """The last user message's text when no tool result or AI message follows it (the first model step
    of a user turn); ``None`` otherwise."""
    for m in reversed(messages):
        if isinstance(m, ToolMessage | AIMessage):
            return None
        if isinstance(m, HumanMessage):
            return m.text if hasattr(m, "text") and isinstance(m.text, str) else str(m.content)
    return None


class FewShotToolSelectorMiddleware(AgentMiddleware):
    """At the first model step of each user turn, offer the agent only the tool that the examples
    say the request needs (``tool_choice`` set to it and one call, so the call is made once), or no tool.

    ``chat`` is an ``EMLoCChatModel`` that answers the selector's skill (the agent's own model is a
    good choice). ``examples`` are ``(request, tool name or None)``.
    ``force_call=False`` offers the chosen tool without requiring the call. ``last_choice`` holds the
    latest choice (``NO_TOOL`` for none), for inspection."""

    def __init__(self, chat: EMLoCChatModel, examples: Sequence[tuple[str, str | None]], *,
                 name: str = "tool_choice", force_call: bool = True) -> None:
        super().__init__()
        self.chat = chat
        self.examples = list(examples)
        self.skill_name = name
        self.force_call = force_call
        self.last_choice: str | None = None
        self._skills: dict[tuple[str, ...], Skill] = {}

    def skill_for(self, tools: Sequence[BaseTool]) -> Skill:
        """The selector skill for ``tools`` (built once per tool set). It is passed to the chat model
        as a ``Skill``, not registered, so it never shows among the registry's skills or tools; its
        memory is stored under its key like any skill's."""
        names = tuple(t.name for t in tools)
        if names not in self._skills:
            self._skills[names] = tool_choice_skill(self.examples, tools, self.skill_name)
        return self._skills[names]

    def choose(self, request: str, tools: Sequence[BaseTool]) -> str:
        """The name of the tool ``request`` needs, or ``NO_TOOL``."""
        skill = self.skill_for(tools)
        return str(self.chat.invoke(skill.format_input(request), config=_INTERNAL, skill=skill).content).strip()

    async def achoose(self, request: str, tools: Sequence[BaseTool]) -> str:
        skill = self.skill_for(tools)
        reply = await self.chat.ainvoke(skill.format_input(request), config=_INTERNAL, skill=skill)
        return str(reply.content).strip()

    def _selectable(self, request: ModelRequest) -> tuple[str, list[BaseTool]] | None:
        text = _turn_started(request.messages)
        tools = [t for t in request.tools if isinstance(t, BaseTool)]
        if text is None or not tools or len(tools) != len(request.tools) or request.tool_choice not in (None, "auto"):
            return None  # not a turn's first step, provider tool dicts, or the caller chose already
        return text, tools

    def _apply(self, request: ModelRequest, choice: str, tools: list[BaseTool]) -> ModelRequest:
        self.last_choice = choice
        if choice == NO_TOOL:
            return request.override(tools=[], tool_choice=None)
        chosen: list[BaseTool | dict[str, Any]] = [t for t in tools if t.name == choice]
        if not self.force_call:
            return request.override(tools=chosen)
        # one required call: a small model under a forced choice may otherwise write the same call twice
        settings = {**request.model_settings, "parallel_tool_calls": False}
        return request.override(tools=chosen, tool_choice=choice, model_settings=settings)

    def wrap_model_call(self, request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]) -> Any:
        picked = self._selectable(request)
        if picked is None:
            return handler(request)
        text, tools = picked
        return handler(self._apply(request, self.choose(text, tools), tools))

    async def awrap_model_call(self, request: ModelRequest,
                               handler: Callable[[ModelRequest], Awaitable[ModelResponse]]) -> Any:
        picked = self._selectable(request)
        if picked is None:
            return await handler(request)
        text, tools = picked
        return await handler(self._apply(request, await self.achoose(text, tools), tools))
