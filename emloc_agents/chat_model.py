"""EMLoCChatModel: a LangChain chat model that answers on the compressed memory of the skill named
per call (declared ``skill`` field, ``skill=`` kwarg, ``.bind(skill=...)`` or a configurable field).
No skill means zero-shot. The model and registry load lazily on first use and are shared.

Tool calling and structured output use constrained decoding (llguidance, see ``structured.py``):
the output is forced to be a valid ``{"name", "arguments"}`` tool call or a document of the
requested JSON schema, so they work on small models too.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Literal, cast

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManager, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput, ModelProfile
from langchain_core.language_models.chat_models import generate_from_stream
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ToolMessage,
    message_chunk_to_message,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.output_parsers import JsonOutputKeyToolsParser, JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, LLMResult
from langchain_core.runnables import Runnable, RunnableConfig, RunnableMap, RunnablePassthrough
from langchain_core.runnables.config import get_config_list, run_in_executor
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from langchain_core.utils.utils import LC_ID_PREFIX
from pydantic import ConfigDict, Field, field_validator

from .engine.decode import Generation, SplitBatch, check_length, first_stop
from .engine.memory import CompressedMemory
from .engine.prompt import answer_stops
from .images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, ImagePolicy
from .messages import to_template_messages, to_turns, with_system
from .registry import MemoryRegistry
from .skills import Skill
from .tool_format import ToolFormat, parse_reply, tool_format
from .tools import skill_tools

if TYPE_CHECKING:
    from .models.lm import LanguageModel

_REGISTRIES: dict[tuple[str, str | None, str, str], MemoryRegistry] = {}  # (model, cache dir, device, dtype)
_REG_LOCK = threading.Lock()
CALL_ARGUMENTS = ("skill", "model", "max_tokens", "temperature", "top_p", "seed", "tools", "tool_choice",
                  "parallel_tool_calls", "response_format")
"""What ``invoke``/``stream``/``bind`` accept besides ``stop`` (anything else is a TypeError)."""
# passed through by LangChain itself (stream=..., structured-output tracing); accepted, not used
_LANGCHAIN_ARGUMENTS = ("stream", "ls_structured_output_format", "structured_output_format")


def check_call_arguments(kwargs: Mapping[str, Any]) -> None:
    """A misspelt argument (``skil="topic"``) must not silently answer zero-shot: raise a TypeError
    that names the accepted ones."""
    unknown = sorted(k for k in kwargs if k not in CALL_ARGUMENTS and k not in _LANGCHAIN_ARGUMENTS)
    if unknown:
        raise TypeError(
            f"EMLoCChatModel got unexpected argument(s) {', '.join(map(repr, unknown))}; "
            f"accepted: stop, {', '.join(CALL_ARGUMENTS)}"
        )


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could be the start of a stop string (not yet sent
    while streaming, so a stop string spanning tokens never leaks its first part)."""
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), keep, -1):
            if text.endswith(s[:n]):
                keep = n
                break
    return keep


@dataclass(frozen=True)
class PreparedCall:
    """One call, ready to decode: the prompt, the memory it runs on, the decoding options, and how
    to read the reply."""

    lm: LanguageModel
    ids: list[int]  # the prompt after the memory
    memory: CompressedMemory | None  # the skill's memory (None: zero-shot)
    skill: str | None
    created: int  # tokens compressed for this call (0 when the memory was stored or no skill)
    gen: dict[str, Any]  # keyword arguments of ``LanguageModel.stream_ids``
    mode: Literal["text", "tools", "json"]
    model_name: str
    text_stops: list[str]  # the stops of a text reply (under a tools grammar too)
    format: ToolFormat  # how the model writes tool calls
    tool_names: list[str]
    choice: str | None = None  # tool_choice as normalised ("auto", "any", "none" or a tool's name)
    answered: frozenset[tuple[str, str]] = frozenset()  # (tool, JSON arguments) of calls with a result

    def repeats(self, message: AIMessage) -> bool:
        """The reply's calls were all made and answered before in this conversation."""
        return bool(message.tool_calls) and all(_call_key(c["name"], c["args"]) in self.answered
                                                for c in message.tool_calls)


def _call_key(name: str, args: Any) -> tuple[str, str]:
    return name, json.dumps(args, sort_keys=True, default=str)


def _answered_calls(messages: Sequence[BaseMessage]) -> frozenset[tuple[str, str]]:
    """The calls of the conversation's AI turns that a tool message answered."""
    answered = {m.tool_call_id for m in messages if isinstance(m, ToolMessage)}
    return frozenset(_call_key(c["name"], c["args"]) for m in messages if isinstance(m, AIMessage)
                     for c in m.tool_calls if c.get("id") in answered)


def _answer_text(text: str) -> str:
    """The reply without leading blanks: plain-rendered memories answer after a space (" positive"),
    and the tools grammar lets blanks lead a call or an answer (see ``tool_grammar``)."""
    return text.lstrip()


def _text_reply_limits(stops: Sequence[str], max_tokens: int, fmt: ToolFormat) -> Callable[[str, int], tuple[int, str] | None]:
    """Under the auto tools grammar: once the reply is text (not a call), end it at the caller's stop
    strings and ``max_tokens``; a call runs until its JSON closes (``json_max_tokens`` at most)."""

    def finish_when(text: str, n_tokens: int) -> tuple[int, str] | None:
        if not text.strip() or fmt.starts_call(text):
            return None
        hit = first_stop(text, stops)
        if hit is not None:
            return hit, "stop"
        return (len(text), "length") if n_tokens >= max_tokens else None

    return finish_when


def _checked(value: Any, name: str, what: str, ok: Callable[[float], bool]) -> float:
    """A per-call number, or a ValueError that says what was expected."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not ok(value):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)


def _stop_list(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list | tuple) or not all(isinstance(s, str) for s in stops):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    return [s for s in stops if s]


def _tool_specs(tools: Any) -> list[dict[str, Any]]:
    """Tools passed per call (``bind_tools`` already converts them) as OpenAI function specs."""
    if not isinstance(tools, list | tuple):
        raise ValueError(f"tools must be a list of tools, got {type(tools).__name__}")
    specs = []
    for i, tool in enumerate(tools):
        try:
            spec = convert_to_openai_tool(tool)
            name = spec["function"]["name"]
        except Exception as e:  # noqa: BLE001 - any malformed tool: one clear error
            raise ValueError(f"tools[{i}] is not a tool (a BaseTool, function, pydantic model or "
                             f"OpenAI function spec): {str(e)[:200] or type(e).__name__}") from e
        if not isinstance(name, str) or not name:
            raise ValueError(f"tools[{i}] has no name")
        specs.append(spec)
    return specs


def _normalise_tool_choice(choice: Any, names: list[str]) -> str:
    if choice is None or choice == "auto":
        return "auto"
    if choice is True or choice in ("any", "required"):
        return "required"
    if choice is False or choice == "none":
        return "none"
    if isinstance(choice, dict):
        choice = (choice.get("function") or {}).get("name") or choice.get("name")
    if isinstance(choice, str) and choice in names:
        return choice
    raise ValueError(f"tool_choice {choice!r} is not 'auto', 'any', 'required', 'none' or one of the tools: {names}")


class EMLoCChatModel(BaseChatModel):
    """Chat model on EMLoC skill memories.

    Example:
        .. code-block:: python

            chat = EMLoCChatModel(model="default", skill="sentiment")
            chat.invoke("Review: great film\\nSentiment:")
            chat.invoke("...", skill="topic")          # per-call switch
            chat.bind(skill="topic").invoke("...")
            chat.bind_tools([my_tool], tool_choice="any").invoke("...")   # constrained tool call
            chat.with_structured_output(MySchema).invoke("...")            # constrained JSON
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    model: str = Field(default="default", alias="model_name")
    """Model name for ``load_model`` (ignored when ``registry`` is given)."""
    registry: MemoryRegistry | None = Field(default=None, exclude=True)
    cache_dir: str | None = None
    device: str = "auto"
    """Where a model loaded by name runs: "auto" (CUDA when present, else the CPU), "cpu", "cuda",
    "cuda:N" or "mps" (ignored when ``registry`` is given)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype of a model loaded by name: "auto" is bfloat16 on CUDA, float32 elsewhere (ignored
    when ``registry`` is given)."""
    skill: str | None = None
    temperature: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(default=256, ge=1)
    json_max_tokens: int = Field(default=256, ge=1)
    """Token budget of constrained JSON outputs (tool calls, structured output): at least
    ``max_tokens``, so a small ``max_tokens`` for chat does not cut a JSON document short."""
    json_max_string_chars: int | None = Field(default=256, ge=1)
    """Strings in constrained JSON without their own ``maxLength`` are capped at this many
    characters, integers without bounds at 15 digits (None: no caps); keeps small models from
    looping inside a value until the budget runs out."""
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    seed: int | None = None
    streaming: bool = False
    repeat_calls: bool = False
    """Whether a call identical to one already answered in the conversation (same tool, same
    arguments, its result present) may be made again under ``tool_choice="auto"``. Off: the model
    answers instead at that step (decoded as under ``tool_choice="none"``): small tool callers repeat a
    call whose result did not say what they expected, until the agent's step limit."""
    cache_prompt: bool = True
    """Start each prompt from the keys/values of the longest prefix it shares with a recent prompt on
    the same skill (an agent resends its system prompt, tools and earlier turns at every step); the
    answer is the one a full prefill gives, up to float rounding."""
    allowed_local_image_dirs: list[str] = Field(default_factory=list)
    """Directories whose image files messages may name by local path or ``file://`` URL (none by
    default: a message's images are then base64 blocks or ``data:`` URLs). Messages are input from
    whoever wrote them; without this, a path in one could make the process read any file it can."""
    max_image_bytes: int = Field(default=DEFAULT_MAX_IMAGE_BYTES, ge=1)
    """Largest image a message may carry, in bytes (read from a file or decoded from base64)."""
    max_image_pixels: int = Field(default=DEFAULT_MAX_IMAGE_PIXELS, ge=1)
    """Largest image a message may carry, in pixels, checked before decoding (decompression bombs)."""

    @property
    def _llm_type(self) -> str:
        return "emloc"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model_name_resolved, "skill": self.skill, "temperature": self.temperature,
                "top_p": self.top_p, "max_tokens": self.max_tokens}

    def _resolve_model_profile(self) -> ModelProfile | None:
        """Context size and capabilities for ``create_agent`` and its middleware, read without loading
        the model (``emloc_agents.profile``)."""
        from .profile import profile_of_model, profile_of_name

        if self.registry is not None and self.registry.loaded_model is not None:
            return profile_of_model(self.registry.loaded_model)
        return profile_of_name(self.model_name_resolved)

    @property
    def model_name_resolved(self) -> str:
        return self.registry.model_name if self.registry is not None else self.model

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "emloc"
        model = kwargs.get("model")
        params["ls_model_name"] = model if isinstance(model, str) and model else self.model_name_resolved
        return params

    @field_validator("allowed_local_image_dirs")
    @classmethod
    def _dirs_exist(cls, dirs: list[str]) -> list[str]:
        ImagePolicy.allowing(dirs)  # a missing directory fails here, not at the first image
        return dirs

    def _image_policy(self) -> ImagePolicy:
        return ImagePolicy.allowing(self.allowed_local_image_dirs, self.max_image_bytes, self.max_image_pixels)

    # ---- backends ----------------------------------------------------------------------------

    def get_registry(self, model: str | None = None) -> MemoryRegistry:
        """The registry serving this call: the given one, or one shared per (model, cache dir)."""
        if self.registry is not None and (model is None or model == self.registry.model_name):
            return self.registry
        name = model or self.model
        cache_dir = self.cache_dir
        if cache_dir is None and self.registry is not None:
            cache_dir = str(self.registry.cache_dir)
        key = (name, cache_dir, self.device, self.dtype)
        with _REG_LOCK:
            if key not in _REGISTRIES:
                _REGISTRIES[key] = MemoryRegistry(model=name, cache_dir=cache_dir, device=self.device,
                                                  dtype=self.dtype)
            return _REGISTRIES[key]

    # ---- token counts ------------------------------------------------------------------------

    def get_token_ids(self, text: str) -> list[int]:
        """``text``'s ids in the model's own tokenizer, offline (LangChain's default fetches GPT-2's)."""
        if self.custom_get_token_ids is not None:
            return self.custom_get_token_ids(text)
        return list(self.get_registry().lm.tokenizer.encode(text, add_special_tokens=False))

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence[Any] | None = None) -> int:
        """The prompt tokens ``messages`` (and ``tools``) take in the model's chat template, as a call
        without a skill renders them, so ``trim_messages`` and the summarisation middleware can keep
        a conversation inside the window: a call's ``usage_metadata`` input tokens less the memory's
        (``input_token_details``)."""
        kwargs: dict[str, Any] = {"skill": None, "tools": list(tools)} if tools else {"skill": None}
        return len(self._prepare(list(messages), None, kwargs).ids)

    # ---- one call ----------------------------------------------------------------------------

    def _prepare(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> PreparedCall:
        from . import structured as st

        check_call_arguments(kwargs)
        model_override = kwargs.pop("model", None)
        registry = self.get_registry(model_override if isinstance(model_override, str) else None)
        skill_name = kwargs.pop("skill", self.skill)
        memory: CompressedMemory | None = None
        skill: Skill | None = None
        created = 0
        instruction = ""
        if skill_name:
            skill = registry.skill(skill_name)
            memory, info = registry.get_with_info(skill)  # this call's own info, not another thread's
            created = info.compressed_tokens if info.source == "compressed" else 0
            instruction = skill.instruction
        lm = registry.lm
        turns = to_turns(messages, self._image_policy())

        tools = _tool_specs(kwargs.pop("tools", None) or [])
        tool_choice = kwargs.pop("tool_choice", None)
        parallel = kwargs.pop("parallel_tool_calls", None)
        if parallel is not None and not isinstance(parallel, bool):
            raise ValueError(f"parallel_tool_calls must be True, False or None, got {parallel!r}")
        fmt = tool_format(lm.tokenizer)
        response_format = kwargs.pop("response_format", None)
        mode: Literal["text", "tools", "json"] = "text"
        hints: list[str] = []
        grammar: str | None = None
        use_template_tools = False
        choice: str | None = None
        if tools:
            choice = _normalise_tool_choice(tool_choice, [t["function"]["name"] for t in tools])
            use_template_tools = (memory is None and not any(t["images"] for t in turns)
                                  and st.template_takes_tools(lm.tokenizer))
            if choice == "none" and fmt.native and use_template_tools:
                # the conversation keeps its native form (calls, tool role); the grammar rules out a call
                grammar = fmt.no_call_grammar()
            elif choice == "none":
                use_template_tools = False
            else:
                mode = "tools"
                chosen = tools if choice in ("auto", "required") else [t for t in tools if t["function"]["name"] == choice]
                if not use_template_tools:
                    fmt = ToolFormat("json")  # tools described in the system text ask for bare JSON calls
                grammar = fmt.grammar(chosen, required=choice != "auto", parallel=parallel is not False,
                                      max_string_chars=self.json_max_string_chars, tokenizer=lm.tokenizer)
                if not use_template_tools:
                    hints.append(st.describe_tools(tools, choice))
        elif response_format is not None:
            mode = "json"
            schema, describe = self._response_schema(response_format)
            grammar = st.json_grammar(st.bound_strings(schema, self.json_max_string_chars))
            if describe:
                hints.append(st.describe_schema(schema))
        elif skill is not None and skill.labels:
            grammar = st.choice_grammar(skill.labels)  # mode "text": the answer is one of the labels
        if hints:
            turns = with_system(turns, "\n\n".join(hints))
        if use_template_tools:
            plain = to_template_messages(messages, self._image_policy()) if fmt.native else [
                {"role": t["role"], "content": t["content"]} for t in turns]
            if instruction:
                plain = with_system(plain, instruction)
            text = lm.tokenizer.apply_chat_template(plain, tools=tools, tokenize=False, add_generation_prompt=True)
            ids = lm.renderer("chat").standalone("", text)
        else:
            ids = lm.encode_conversation(turns, instruction=instruction, memory=memory)

        max_tokens = int(_checked(kwargs.pop("max_tokens", self.max_tokens), "max_tokens", "an integer >= 1",
                                  lambda v: float(v).is_integer() and v >= 1))
        seed = kwargs.pop("seed", self.seed)
        if seed is not None:
            seed = int(_checked(seed, "seed", "an integer or None", lambda v: float(v).is_integer()))
        gen_kw: dict[str, Any] = dict(
            max_new_tokens=max_tokens,
            temperature=_checked(kwargs.pop("temperature", self.temperature), "temperature", "a number >= 0",
                                 lambda v: 0 <= v < math.inf),
            top_p=_checked(kwargs.pop("top_p", self.top_p), "top_p", "a number in (0, 1]", lambda v: 0 < v <= 1),
            stop=_stop_list(self._stops(stop, skill, memory)),
            seed=seed,
            prompt_cache=getattr(lm, "prompt_cache", None) if self.cache_prompt else None,
        )
        text_stops = gen_kw["stop"]
        if grammar is not None and mode == "text":  # no call (tool_choice="none"), or a skill's label
            gen_kw["logits_processor"] = [st.GrammarLogitsProcessor(lm.tokenizer, grammar)]
        elif grammar is not None:
            gen_kw["max_new_tokens"] = max(max_tokens, self.json_max_tokens)
            gen_kw["stop"] = []  # the grammar decides where a JSON document ends
            gen_kw["logits_processor"] = [st.GrammarLogitsProcessor(lm.tokenizer, grammar)]
            if choice == "auto":  # a text reply keeps the caller's stop and max_tokens
                gen_kw["finish_when"] = _text_reply_limits(text_stops, max_tokens, fmt)
            else:
                text_stops = []
        return PreparedCall(lm=lm, ids=ids, memory=memory, skill=skill_name, created=created, gen=gen_kw, mode=mode,
                            model_name=registry.model_name, text_stops=text_stops, format=fmt,
                            tool_names=[t["function"]["name"] for t in tools], choice=choice,
                            answered=_answered_calls(messages) if choice == "auto" else frozenset())

    def _stops(self, stop: list[str] | None, skill: Skill | None, memory: CompressedMemory | None) -> Any:
        """The call's ``stop``, else the model's, else where the skill's demonstrated answers end
        (``answer_stops``): a skill answers its answer and no invented demonstrations after it."""
        if stop is not None:
            return stop
        if self.stop is not None:
            return self.stop
        if skill is None or not skill.demonstrations:
            return None
        chat = memory is not None and memory.render_mode == "chat"
        return answer_stops("chat" if chat else "plain", [d.output for d in skill.demonstrations])

    @staticmethod
    def _response_schema(response_format: Any) -> tuple[dict[str, Any], bool]:
        """(JSON schema to constrain to, whether to describe it in the prompt)."""
        if not isinstance(response_format, dict):
            return convert_to_json_schema(response_format), True
        if response_format.get("type") == "json_object":  # json_mode: the prompt asks for the format
            return response_format.get("schema") or {"type": "object"}, False
        if response_format.get("type") == "json_schema" and isinstance(response_format.get("json_schema"), dict):
            return response_format["json_schema"].get("schema", {"type": "object"}), True
        return response_format, True

    def _metadata(self, p: PreparedCall, g: Generation) -> tuple[UsageMetadata, dict[str, Any]]:
        memory = p.memory
        read = round(memory.memory_tokens / memory.num_layers) if memory is not None else 0
        created = p.created
        input_tokens = g.prompt_tokens + read + created
        usage = UsageMetadata(
            input_tokens=input_tokens,
            output_tokens=len(g.token_ids),
            total_tokens=input_tokens + len(g.token_ids),
            input_token_details={"cache_read": read, "cache_creation": created},
        )
        meta = {
            "model_name": p.model_name,
            "model_provider": "emloc",
            "skill": p.skill,
            "memory_tokens": read,
            "original_tokens": memory.original_length if memory is not None else 0,
            "kept_ratio": memory.kept_ratio if memory is not None else None,
            "finish_reason": g.finish_reason,
            "ttft_s": g.ttft_s,
        }
        return usage, meta

    def _message(self, p: PreparedCall, g: Generation) -> AIMessage:
        usage, meta = self._metadata(p, g)
        text = _answer_text(g.text)
        if p.mode == "tools":
            reply = parse_reply(text, p.tool_names, p.format)
            if reply.tool_calls:
                meta["finish_reason"] = "tool_calls"
            return AIMessage(content=reply.content, tool_calls=reply.tool_calls, invalid_tool_calls=reply.invalid_tool_calls,
                             usage_metadata=usage, response_metadata=meta)
        return AIMessage(content=text, usage_metadata=usage, response_metadata=meta)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.streaming:
            return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))
        p = self._prepare(messages, stop, dict(kwargs))
        g = p.lm.generate_ids(p.ids, p.memory, **p.gen)
        msg = self._message(p, g)
        if not self.repeat_calls and p.repeats(msg):
            return self._generate(messages, stop, run_manager, **{**kwargs, "tool_choice": "none"})
        return ChatResult(generations=[ChatGeneration(message=msg, generation_info={"finish_reason": g.finish_reason})])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        p = self._prepare(messages, stop, dict(kwargs))
        yield from self._chunks(p, p.lm.stream_ids(p.ids, p.memory, **p.gen), messages, stop, run_manager, kwargs)

    def _chunks(
        self,
        p: PreparedCall,
        decoded: Iterable[tuple[str, Generation | None]],
        messages: list[BaseMessage],
        stop: list[str] | None,
        run_manager: CallbackManagerForLLMRun | None,
        kwargs: dict[str, Any],
    ) -> Iterator[ChatGenerationChunk]:
        """The chunks of one reply from its decoded (text delta, final) pairs: text as it comes, held
        back where it may be a stop or a call; calls whole once complete; usage last."""
        buffering: bool | None = None if p.mode == "tools" else False  # tools: decided by the 1st non-blank
        stops = p.text_stops
        sent = ""  # text yielded so far
        raw = ""  # text decoded so far
        for delta, final in decoded:
            raw += delta
            if final is not None:
                # the final text is authoritative: it flushes what was held back (a stop-string
                # prefix that did not complete, a cut multi-byte character)
                raw = final.text
            seen = _answer_text(raw)
            if buffering is None and seen:
                buffering = p.format.may_hold_call(seen)
            if not buffering:
                ready = seen if final is not None else seen[: len(seen) - _held_back(seen, stops)]
                if ready.startswith(sent) and len(ready) > len(sent):
                    piece, sent = ready[len(sent) :], ready
                    chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
                    if run_manager:
                        run_manager.on_llm_new_token(piece, chunk=chunk)
                    yield chunk
            if final is None:
                continue
            usage, meta = self._metadata(p, final)
            reply = parse_reply(seen, p.tool_names, p.format) if p.mode == "tools" else None
            if (reply is not None and buffering and not self.repeat_calls
                    and p.repeats(AIMessage(content="", tool_calls=reply.tool_calls))):
                yield from self._stream(messages, stop, run_manager, **{**kwargs, "tool_choice": "none"})
                return
            if reply is not None and (buffering or reply.tool_calls):
                # calls are sent whole once complete; a buffered reply's text comes with them (a reply
                # streamed as text keeps its fence: only the call is added)
                if reply.tool_calls:
                    meta["finish_reason"] = "tool_calls"
                chunks = [{"name": c["name"], "args": json.dumps(c["args"], ensure_ascii=False), "id": c["id"],
                           "index": i, "type": "tool_call_chunk"} for i, c in enumerate(reply.tool_calls)]
                chunks += [{"name": None, "args": c["args"], "id": c["id"], "index": len(chunks) + i,
                            "type": "tool_call_chunk"} for i, c in enumerate(reply.invalid_tool_calls)]
                yield ChatGenerationChunk(message=AIMessageChunk(content=reply.content if buffering else "",
                                                                 tool_call_chunks=chunks))
            yield ChatGenerationChunk(
                message=AIMessageChunk(content="", usage_metadata=usage, response_metadata=meta, chunk_position="last"),
                generation_info={"finish_reason": final.finish_reason},
            )

    def stream_together(
        self, inputs: Sequence[LanguageModelInput], options: Sequence[dict[str, Any]] | None = None
    ) -> list[Iterator[AIMessageChunk]]:
        """Stream several calls at once: calls on the same skill's memory (or all zero-shot) are decoded
        as one batch (``engine.decode.stream_batch``), one packed forward per token for all of them,
        which on most hardware costs little more than one call's forward; each reply is the one that
        ``stream(input, **options)`` gives alone (tokens equal up to float rounding). Returns one
        iterator of message chunks per input, to be read from one thread in any order (reading one
        advances the batch). A call that cannot be prepared (an unknown skill, a prompt too long)
        raises its error when its iterator is read; the others go on. Prompts with images and lone
        calls take the ``stream`` path. No callbacks run (a server's batching path, not a Runnable)."""
        options = list(options) if options is not None else [{} for _ in inputs]
        if len(options) != len(inputs):
            raise ValueError(f"{len(inputs)} inputs but {len(options)} option sets")
        calls: list[tuple[list[BaseMessage], list[str] | None, dict[str, Any], PreparedCall | Exception]] = []
        for value, kw in zip(inputs, options, strict=True):
            messages = self._convert_input(value).to_messages()
            stop, rest = kw.get("stop"), {k: v for k, v in kw.items() if k != "stop"}
            try:
                p = self._prepare(messages, stop, dict(rest))
                memory_tokens = p.memory.original_length if p.memory is not None else 0
                check_length(p.lm, len(p.ids), memory_tokens, p.gen["max_new_tokens"])
                calls.append((messages, stop, rest, p))
            except Exception as e:  # noqa: BLE001 - raised to this call's reader only
                calls.append((messages, stop, rest, e))
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (*_, call) in enumerate(calls):
            if isinstance(call, PreparedCall) and getattr(call.lm, "vision", None) is None:
                groups.setdefault((id(call.lm), id(call.memory)), []).append(i)
        sources: dict[int, Iterator[tuple[str, Generation | None]]] = {}
        for members in groups.values():
            if len(members) < 2:
                continue
            prepared = [cast(PreparedCall, calls[i][3]) for i in members]
            split = SplitBatch(prepared[0].lm, [q.ids for q in prepared], prepared[0].memory,
                               [{k: v for k, v in q.gen.items() if k != "prompt_cache"} for q in prepared])
            sources.update({i: split.reply(j) for j, i in enumerate(members)})
        return [self._reply_stream(messages, stop, rest, call, sources.get(i))
                for i, (messages, stop, rest, call) in enumerate(calls)]

    def batch(self, inputs: list[LanguageModelInput], config: RunnableConfig | list[RunnableConfig] | None = None,
              *, return_exceptions: bool = False, **kwargs: Any) -> list[Any]:
        """Answer ``inputs`` together: calls on the same skill (or all zero-shot) decode as one packed
        batch (``stream_together``), each answer the one ``invoke`` gives alone. Each input is its own
        run for LangChain's callbacks and tracing (its config's callbacks, tags, metadata, run name);
        a call that fails (an unknown skill, a prompt too long) is returned as its exception with
        ``return_exceptions``, else the first failure is raised once the batch is stopped."""
        if not inputs:
            return []
        configs = get_config_list(config, len(inputs))
        messages = [self._convert_input(x).to_messages() for x in inputs]
        stop = kwargs.pop("stop", None)
        params = {**self._get_invocation_params(stop=stop, **kwargs), "stop": stop}
        runs = []
        for cfg, msgs in zip(configs, messages, strict=True):
            callbacks = CallbackManager.configure(cfg.get("callbacks"), self.callbacks, self.verbose, cfg.get("tags"),
                                                  self.tags, cfg.get("metadata"), self.metadata)
            runs.append(callbacks.on_chat_model_start(self._serialized, [msgs], invocation_params=params,
                                                      options={"stop": stop, **kwargs}, name=cfg.get("run_name"),
                                                      run_id=cfg.get("run_id"), batch_size=1)[0])
        streams = self.stream_together(messages, [{**kwargs, "stop": stop} for _ in inputs])
        out: list[Any] = []
        try:
            for run, stream in zip(runs, streams, strict=True):
                try:
                    merged: AIMessageChunk | None = None
                    for chunk in stream:
                        merged = chunk if merged is None else merged + chunk
                    message = message_chunk_to_message(merged or AIMessageChunk(content=""))
                    message.id = message.id or f"{LC_ID_PREFIX}-{run.run_id}-0"  # as invoke names it
                except Exception as e:  # noqa: BLE001 - the run's own failure, reported to its callbacks
                    run.on_llm_error(e)
                    if not return_exceptions:
                        raise
                    out.append(e)
                    continue
                finish = message.response_metadata.get("finish_reason")
                run.on_llm_end(LLMResult(generations=[[ChatGeneration(message=message,
                                                                      generation_info={"finish_reason": finish})]]))
                out.append(message)
        finally:
            for stream in streams:
                stream.close()  # type: ignore[attr-defined]  # generators: what was not read leaves the batch
        return out

    async def abatch(self, inputs: list[LanguageModelInput],
                     config: RunnableConfig | list[RunnableConfig] | None = None, *, return_exceptions: bool = False,
                     **kwargs: Any) -> list[Any]:
        """``batch`` in a worker thread: the event loop goes on while the batch decodes."""
        return await run_in_executor(None, self.batch, inputs, config, return_exceptions=return_exceptions, **kwargs)

    def _reply_stream(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any],
                      p: PreparedCall | Exception, source: Iterator[tuple[str, Generation | None]] | None
                      ) -> Iterator[AIMessageChunk]:
        if isinstance(p, Exception):
            raise p
        decoded = source if source is not None else p.lm.stream_ids(p.ids, p.memory, **p.gen)
        try:
            for chunk in self._chunks(p, decoded, messages, stop, None, kwargs):
                yield cast(AIMessageChunk, chunk.message)
        finally:
            if source is not None:
                source.close()  # type: ignore[attr-defined]  # a generator: leaves the batch

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.streaming:
            chunks = [c async for c in self._astream(messages, stop, run_manager, **kwargs)]
            return generate_from_stream(iter(chunks))
        return await asyncio.to_thread(self._generate, messages, stop, None, **kwargs)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        """Decodes in a worker thread; chunks cross to the event loop through a queue, so the loop is
        never blocked. A consumer that stops early stops the worker at the next token."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        done = object()
        cancelled = threading.Event()

        def produce() -> None:
            try:
                for chunk in self._stream(messages, stop, None, **kwargs):
                    if cancelled.is_set():
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, chunk)
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
                loop.call_soon_threadsafe(queue.put_nowait, e)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)

        task = loop.run_in_executor(None, produce)
        try:
            while True:
                item = await queue.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                if run_manager and item.message.content:
                    await run_manager.on_llm_new_token(item.message.content, chunk=item)
                yield item
        finally:
            cancelled.set()
            await task

    def bind(self, **kwargs: Any) -> Any:
        """Bind call arguments (``skill=...``, ``stop=...``, ``max_tokens=...``, ...); unknown names raise
        TypeError now rather than being ignored at every later call."""
        check_call_arguments({k: v for k, v in kwargs.items() if k != "stop"})
        if "stop" in kwargs:
            _stop_list(kwargs["stop"])  # a bad stop fails here, not at every later call
        return super().bind(**kwargs)

    def skill_tools(self, registry: MemoryRegistry | None = None, *, return_direct: bool = False) -> list[BaseTool]:
        """One LangChain tool per skill of ``registry`` (default: this model's), each answering with this
        model bound to its skill (``tools.skill_tools``; ``registry.as_tools(chat)`` calls this)."""
        return skill_tools(registry or self.get_registry(), self, return_direct=return_direct)

    # ---- tools and structured output -----------------------------------------------------------

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: dict[str, Any] | str | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools; calls are generated under a grammar of valid ``{"name", "arguments"}`` JSON.

        ``tool_choice``: ``"auto"``/None (the model picks text or a call at its first non-blank token),
        ``"any"``/``"required"``/True (must call one), a tool name (must call that one), ``"none"``.
        ``parallel_tool_calls``: models with a native call format (``tool_format``) may make several
        calls in one turn unless it is False; the JSON format makes one. ``strict`` is accepted: calls
        are always schema-valid."""
        kwargs.pop("strict", None)
        formatted = [convert_to_openai_tool(t) for t in tools]
        names = [t["function"]["name"] for t in formatted]
        choice = _normalise_tool_choice(tool_choice, names)
        return self.bind(tools=formatted, tool_choice=choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:
        """Structured output for a pydantic model (v1 or v2), TypedDict or JSON schema.

        ``json_schema`` (default): the answer is generated under the schema's grammar.
        ``function_calling``: a forced call of a tool with that schema, parsed from ``tool_calls``.
        ``json_mode``: the prompt asks for JSON; decoding is constrained to the schema all the same."""
        if kwargs:
            raise ValueError(f"unexpected arguments: {sorted(kwargs)}")
        if schema is None:
            raise ValueError("with_structured_output needs a schema")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        ls_format = {"kwargs": {"method": method, "strict": strict}, "schema": schema}
        if method == "function_calling":
            tool_name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=tool_name, ls_structured_output_format=ls_format)
            parser: Runnable[Any, Any] = (
                PydanticToolsParser(tools=[schema], first_tool_only=True)  # type: ignore[list-item]
                if is_pydantic
                else JsonOutputKeyToolsParser(key_name=tool_name, first_tool_only=True)
            )
        elif method in ("json_schema", "json_mode"):
            json_schema = convert_to_json_schema(schema)
            fmt = {"type": "json_object", "schema": json_schema} if method == "json_mode" else json_schema
            llm = self.bind(response_format=fmt, ls_structured_output_format=ls_format)
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()  # type: ignore[arg-type]
        else:
            raise ValueError(f"unknown method {method!r}; use 'json_schema', 'function_calling' or 'json_mode'")
        if not include_raw:
            return llm | parser
        parser_assign = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        parser_none = RunnablePassthrough.assign(parsed=lambda _: None)
        parser_with_fallback = parser_assign.with_fallbacks([parser_none], exception_key="parsing_error")
        return RunnableMap(raw=llm) | parser_with_fallback

