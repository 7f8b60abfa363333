"""Skills as LangChain tools, and SkillRouter: pick a skill for an input by similarity to each
skill's demonstrations (few-shot skill routing, RAG-like), with a threshold and zero-shot fallback."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from langchain_core.language_models import BaseChatModel
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.tools import BaseTool, StructuredTool
from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from .registry import MemoryRegistry
    from .skills import Skill


AGENT_SYSTEM_PROMPT = (
    "You are a helpful assistant. You have tools, but most questions need none. Call a tool only when the "
    "request asks for exactly what the tool's description says it does: call it once with the user's text, "
    "and when the tool response arrives, answer in one short sentence that gives the tool's result. "
    "Otherwise answer directly in one short sentence, without a tool. For example, 'What is the capital of "
    "Italy?' is answered 'The capital of Italy is Rome.' and 'Say hi.' is answered 'Hi!', with no tool."
)
"""A system prompt for ``create_agent`` with skill tools. Small tool callers call a tool for nearly
every request unless told when not to, and repeat their call after its result unless told to answer
then; this wording was chosen on requests outside the agent study (``scripts/agent_prompt_search.py``,
docs/agents.md)."""


class SkillInput(BaseModel):
    input: str = Field(description="The text to handle, as the user gave it.")


def skill_tool(skill: Skill, answer: Runnable[Any, Any], return_direct: bool = False,
               certificate: Callable[[], dict[str, Any] | None] | None = None) -> BaseTool:
    """The tool for ``skill``, answered by ``answer``: any runnable that takes the phrased input and
    returns a message on that skill (an ``EMLoCChatModel`` bound to it, or a chat model that calls a
    server serving it). One construction for both, so a skill is the same tool in process and remote:
    its name, ``tool_description()``, ``SkillInput`` and the input phrased with ``format_input``.

    ``certificate``: returns the skill memory's fidelity certificate (``CompressedMemory.certificate``)
    or None while it has none; the tool's ``metadata["certificate"]`` holds it, read when the tool is
    made and again after every call (a memory is compressed on its first use)."""

    def note() -> None:
        if certificate is not None:
            tool.metadata = {**(tool.metadata or {}), "certificate": certificate()}

    def run(input: str) -> str:
        out = str(answer.invoke(skill.format_input(input)).content)
        note()
        return out

    async def arun(input: str) -> str:
        out = str((await answer.ainvoke(skill.format_input(input))).content)
        note()
        return out

    tool = StructuredTool.from_function(
        func=run, coroutine=arun, name=skill.name, description=skill.tool_description(),
        args_schema=SkillInput, return_direct=return_direct,
    )
    note()
    return tool


def skill_tools(registry: MemoryRegistry, chat: BaseChatModel, return_direct: bool = False) -> list[BaseTool]:
    """One tool per skill of ``registry``; calling it answers with ``chat`` (an ``EMLoCChatModel`` on
    that registry) bound to the skill. The input is phrased like the demonstrations first
    (``Skill.format_input``), so an agent may pass raw text. The reply ends where the demonstrations'
    answers end (one of the skill's labels when it has them), and the description tells an agent what
    the skill does, answers, and an example. ``return_direct``: LangChain's flag, so that an agent
    ends its turn on the skill's answer instead of restating it (a small agent model, restating,
    sometimes answers the user's text instead). Users call ``registry.as_tools(chat)``."""
    return [skill_tool(skill, chat.bind(skill=skill.name), return_direct,
                       certificate=functools.partial(registry.certificate, skill.name))
            for skill in registry.skills()]


def embed(registry: MemoryRegistry, texts: list[str]) -> torch.Tensor:
    """Mean-pooled last hidden states of the loaded model, L2-normalised (no extra model needed)."""
    from .engine.forward import backbone

    lm = registry.lm
    out = []
    with torch.inference_mode():
        for text in texts:
            ids = lm.tokenizer(text, return_tensors="pt", add_special_tokens=True)["input_ids"][:, :256].to(lm.device)
            hidden = backbone(lm.model)(input_ids=ids).last_hidden_state[0].float()
            out.append(torch.nn.functional.normalize(hidden.mean(0), dim=-1))
    return torch.stack(out).cpu()  # router arithmetic is tiny: the host


class SkillRouter(Runnable[Any, dict[str, Any]]):
    """Route an input to the skill whose demonstrations it most resembles.

    ``invoke(text)`` returns ``{"input", "skill", "score", "scores"}``; ``skill`` is ``None`` (zero-shot)
    when the best score is under ``threshold``. Score = mean cosine similarity to the ``top_k`` most
    similar demonstrations of each skill.
    """

    def __init__(self, registry: MemoryRegistry, threshold: float = 0.0, top_k: int = 3) -> None:
        self.registry = registry
        self.threshold = threshold
        self.top_k = top_k
        self._index: dict[str, torch.Tensor] = {}
        self._hashes: dict[str, str] = {}
        self._lock = threading.Lock()

    def _demo_embeddings(self) -> dict[str, torch.Tensor]:
        with self._lock:
            for skill in self.registry.skills():
                h = skill.content_hash()
                if self._hashes.get(skill.name) != h and skill.demonstrations:
                    self._index[skill.name] = embed(self.registry, [d.input for d in skill.demonstrations])
                    self._hashes[skill.name] = h
            return dict(self._index)

    def scores(self, text: str) -> dict[str, float]:
        q = embed(self.registry, [text])[0]
        out = {}
        for name, emb in self._demo_embeddings().items():
            sims = emb @ q
            out[name] = float(sims.topk(min(self.top_k, len(sims))).values.mean())
        return out

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> dict[str, Any]:
        text = input if isinstance(input, str) else input.get("input", "")
        scores = self.scores(text)
        best = max(scores, key=scores.__getitem__) if scores else None
        if best is not None and scores[best] < self.threshold:
            best = None
        return {"input": text, "skill": best, "score": scores.get(best) if best else None, "scores": scores}

    def answer_with(self, chat: BaseChatModel) -> Runnable[Any, Any]:
        """A chain: route, then answer on the chosen skill (zero-shot if none passed the threshold)."""
        from langchain_core.runnables import RunnableLambda

        def answer(routed: dict[str, Any]) -> Any:
            return chat.invoke(routed["input"], skill=routed["skill"])

        return self | RunnableLambda(answer)
