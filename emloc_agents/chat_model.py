"""EMLoCChatModel: a LangChain chat model that answers on the compressed memory of the skill named
per call (declared ``skill`` field, ``skill=`` kwarg, ``.bind(skill=...)`` or a configurable field).
No skill means zero-shot. The model and registry load lazily on first use and are shared."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field, PrivateAttr

from .engine.decode import Generation
from .engine.memory import CompressedMemory
from .registry import MemoryRegistry

_REGISTRIES: dict[tuple[str, str | None], MemoryRegistry] = {}
_REG_LOCK = threading.Lock()


class UnsupportedContentError(ValueError):
    """A message content block this model cannot take (images on a text model, audio, files)."""


def _text_of(message: BaseMessage) -> str:
    """The text of a message; non-text blocks raise a clear error (this is a text-only model)."""
    content = message.content
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
            continue
        kind = block.get("type")
        if kind == "text":
            parts.append(block.get("text", ""))
        elif kind in ("image", "image_url"):
            raise UnsupportedContentError(
                "this model is text-only: image content blocks need a vision-language model"
            )
        else:
            raise UnsupportedContentError(f"unsupported content block type {kind!r} (text only)")
    return "".join(parts)


def _role(message: BaseMessage) -> str:
    if isinstance(message, SystemMessage):
        return "system"
    if isinstance(message, HumanMessage):
        return "user"
    if isinstance(message, AIMessage):
        return "assistant"
    if isinstance(message, ToolMessage):
        return "user"  # small chat templates have no tool role; the result reads as user input
    return "user"


def to_turns(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages -> role/content dicts, merging consecutive same-role messages."""
    turns: list[dict[str, str]] = []
    for m in messages:
        role, text = _role(m), _text_of(m)
        if isinstance(m, ToolMessage):
            text = f"Tool result ({m.name or m.tool_call_id}): {text}"
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n" + text
        else:
            turns.append({"role": role, "content": text})
    if not turns:
        raise ValueError("no messages to answer")
    return turns


class EMLoCChatModel(BaseChatModel):
    """Chat model on EMLoC skill memories.

    Example:
        .. code-block:: python

            chat = EMLoCChatModel(model="default", skill="sentiment")
            chat.invoke("Review: great film\\nSentiment:")
            chat.invoke("...", skill="topic")          # per-call switch
            chat.bind(skill="topic").invoke("...")
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    model: str = Field(default="default", alias="model_name")
    """Model name for ``load_model`` (ignored when ``registry`` is given)."""
    registry: MemoryRegistry | None = Field(default=None, exclude=True)
    cache_dir: str | None = None
    skill: str | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    seed: int | None = None
    streaming: bool = False

    _gen_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @property
    def _llm_type(self) -> str:
        return "emloc"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model_name_resolved, "skill": self.skill, "temperature": self.temperature,
                "top_p": self.top_p, "max_tokens": self.max_tokens}

    @property
    def model_name_resolved(self) -> str:
        return self.registry.model_name if self.registry is not None else self.model

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "emloc"
        params["ls_model_name"] = self.model_name_resolved
        return params

    # ---- backends ----------------------------------------------------------------------------

    def get_registry(self) -> MemoryRegistry:
        if self.registry is not None:
            return self.registry
        key = (self.model, self.cache_dir)
        with _REG_LOCK:
            if key not in _REGISTRIES:
                _REGISTRIES[key] = MemoryRegistry(model=self.model, cache_dir=self.cache_dir)
            return _REGISTRIES[key]

    # ---- one call ----------------------------------------------------------------------------

    def _prepare(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        registry = self.get_registry()
        skill_name = kwargs.pop("skill", self.skill)
        memory: CompressedMemory | None = None
        created = 0
        instruction = ""
        if skill_name:
            skill = registry.skill(skill_name)
            memory = registry.get(skill)
            info = registry.info(skill)
            created = info.compressed_tokens if info and info.source == "compressed" else 0
            instruction = skill.instruction
        lm = registry.lm
        ids = lm.encode_conversation(to_turns(messages), instruction=instruction, memory=memory)
        stops = list(stop or self.stop or [])
        gen_kw = dict(
            max_new_tokens=int(kwargs.pop("max_tokens", self.max_tokens)),
            temperature=float(kwargs.pop("temperature", self.temperature)),
            top_p=float(kwargs.pop("top_p", self.top_p)),
            stop=stops,
            seed=kwargs.pop("seed", self.seed),
        )
        return {"lm": lm, "ids": ids, "memory": memory, "skill": skill_name, "created": created, "gen": gen_kw}

    def _metadata(self, p: dict[str, Any], g: Generation) -> tuple[UsageMetadata, dict[str, Any]]:
        memory: CompressedMemory | None = p["memory"]
        read = round(memory.memory_tokens / memory.num_layers) if memory is not None else 0
        usage = UsageMetadata(
            input_tokens=g.prompt_tokens + read,
            output_tokens=len(g.token_ids),
            total_tokens=g.prompt_tokens + read + len(g.token_ids),
            input_token_details={"cache_read": read, "cache_creation": p["created"]},
        )
        meta = {
            "model_name": self.model_name_resolved,
            "model_provider": "emloc",
            "skill": p["skill"],
            "memory_tokens": read,
            "original_tokens": memory.original_length if memory is not None else 0,
            "kept_ratio": memory.kept_ratio if memory is not None else None,
            "finish_reason": g.finish_reason,
            "ttft_s": g.ttft_s,
        }
        return usage, meta

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.streaming:
            chunks = list(self._stream(messages, stop, run_manager, **kwargs))
            message = chunks[0].message
            for c in chunks[1:]:
                message = message + c.message
            msg = AIMessage(content=message.content, usage_metadata=message.usage_metadata,
                            response_metadata=message.response_metadata, id=message.id)
            return ChatResult(generations=[ChatGeneration(message=msg)])
        p = self._prepare(messages, stop, dict(kwargs))
        g = p["lm"].generate_ids(p["ids"], p["memory"], **p["gen"])
        usage, meta = self._metadata(p, g)
        msg = AIMessage(content=g.text, usage_metadata=usage, response_metadata=meta)
        return ChatResult(generations=[ChatGeneration(message=msg, generation_info={"finish_reason": g.finish_reason})])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        p = self._prepare(messages, stop, dict(kwargs))
        for delta, final in p["lm"].stream_ids(p["ids"], p["memory"], **p["gen"]):
            if final is None:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
                if run_manager:
                    run_manager.on_llm_new_token(delta, chunk=chunk)
                yield chunk
            else:
                usage, meta = self._metadata(p, final)
                yield ChatGenerationChunk(
                    message=AIMessageChunk(content="", usage_metadata=usage, response_metadata=meta,
                                           chunk_position="last"),
                    generation_info={"finish_reason": final.finish_reason},
                )

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return await asyncio.to_thread(self._generate, messages, stop, None, **kwargs)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        done = object()

        def produce() -> None:
            try:
                for chunk in self._stream(messages, stop, None, **kwargs):
                    loop.call_soon_threadsafe(queue.put_nowait, chunk)
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
                loop.call_soon_threadsafe(queue.put_nowait, e)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)

        task = loop.run_in_executor(None, produce)
        while True:
            item = await queue.get()
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            if run_manager and item.message.content:
                await run_manager.on_llm_new_token(item.message.content, chunk=item)
            yield item
        await task


def chat_model_for(cache_dir: str | Path | None = None, **kwargs: Any) -> EMLoCChatModel:
    return EMLoCChatModel(cache_dir=str(cache_dir) if cache_dir else None, **kwargs)
