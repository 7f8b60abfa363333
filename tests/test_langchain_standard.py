"""LangChain's standard chat-model suites: unit tests on a tiny random model (construction must be
cheap and lazy), integration tests on the real SmolLM2-135M and Qwen2.5-Coder-0.5B (slow)."""

from __future__ import annotations

import tempfile
from typing import Any

import pytest
from langchain_core.messages import AIMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from emloc_agents import EMLoCChatModel, MemoryRegistry
from tests.conftest import make_skill


class TestEMLoCChatModelUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[EMLoCChatModel]:
        return EMLoCChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": "tiny-llama"}

    @property
    def supports_image_inputs(self) -> bool:
        return False


# langchain-tests' async tests are plain ``async def``: run them with pytest-asyncio without
# needing ``asyncio_mode = "auto"`` in the project config (the suite forbids overriding its tests,
# so the mark goes on the module; sync tests ignore it)
pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.filterwarnings("ignore:The test <Function .* is marked with '@pytest.mark.asyncio'"),
]


_AUTO_REASON = (
    "tool_choice='auto': the grammar lets the model choose free text or a tool call at its first "
    "non-blank token, and SmolLM2-135M-Instruct (tuned on smol-smoltalk, which has no function-calling "
    "data) answers in text. Measured on 12 requests needing one of 3 tools and 12 that need none: the "
    "first-token P(call) averages 0.1% (max 0.4%) with describe_tools, 1.3% (max 3.5%) with "
    "SmolLM2-1.7B's trained <tool_call>[...] prompt and 1.4% (max 4.3%) with the Hermes/Qwen "
    "<tool_call> prompt: 0/12 calls end to end with each; this prompt gets 0.1%-1.9%. Few-shot "
    "demonstration turns raise calls to 3-4/12 but pick the right tool 0-2/12 (surface imitation). "
    "Gemma-3 270M: 0/15 calls. A contextually calibrated decision ranks requests well (AUC 0.93) "
    "but misses this one and re-calls after every tool result (docs/benchmarks.md)"
)


class _IntegrationSetup:
    """What both models' integration suites share (a mixin: the suite forbids overriding its tests)."""

    MODEL = "smollm2-135m"
    _registry: MemoryRegistry | None = None

    @property
    def chat_model_class(self) -> type[EMLoCChatModel]:
        return EMLoCChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # short answers keep the suite fast on 2 cores; JSON outputs get their own budget
        return {"model": self.MODEL, "max_tokens": 16, "json_max_tokens": 160, "json_max_string_chars": 48}

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def model_override_value(self) -> str | None:
        return "tiny-llama"  # per-call ``model=`` switches to another (shared, lazily loaded) model

    @property
    def supports_image_inputs(self) -> bool:
        return False  # SmolLM2 is a text model; images raise a clear error

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supported_usage_metadata_details(self) -> dict[str, list[str]]:
        return {"invoke": ["cache_read_input", "cache_creation_input"],
                "stream": ["cache_read_input", "cache_creation_input"]}

    def _skill_chat(self) -> EMLoCChatModel:
        cls = type(self)
        if cls._registry is None:
            cls._registry = MemoryRegistry(model=cls.MODEL, cache_dir=tempfile.mkdtemp(prefix="emloc-std-"))
            cls._registry.add(make_skill(n=4, name="sentiment"))
        return EMLoCChatModel(registry=cls._registry, skill="sentiment", max_tokens=4)

    def _call(self, stream: bool) -> AIMessage:
        chat = self._skill_chat()
        q = "Review: a joyful, clever film\nSentiment:"
        if not stream:
            return chat.invoke(q)
        full = None
        for chunk in chat.stream(q):
            full = chunk if full is None else full + chunk
        assert full is not None
        return full  # type: ignore[return-value]

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        self._skill_chat().get_registry().get("sentiment")  # make sure the memory exists
        msg = self._call(stream)
        assert msg.usage_metadata["input_token_details"]["cache_read"] > 0
        return msg

    def invoke_with_cache_creation_input(self, *, stream: bool = False) -> AIMessage:
        reg = self._skill_chat().get_registry()
        reg.remove("sentiment")  # forget the memory: this call compresses it again
        reg.add(make_skill(n=4, name="sentiment"))
        msg = self._call(stream)
        assert msg.usage_metadata["input_token_details"]["cache_creation"] > 0
        return msg



@pytest.mark.slow
class TestEMLoCChatModelIntegration(_IntegrationSetup, ChatModelIntegrationTests):
    @pytest.mark.xfail(reason=_AUTO_REASON, strict=False)
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_agent_loop(self, model: Any) -> None:
        super().test_agent_loop(model)



@pytest.mark.slow
class TestEMLoCChatModelIntegrationQwen(_IntegrationSetup, ChatModelIntegrationTests):
    """The same suite on the tool-trained model, which calls tools in its chat template's Hermes
    format (``tool_format``): nothing is overridden, so the agent loop runs unforced, with no xfail."""

    MODEL = "qwen2.5-coder-0.5b"
    _registry: MemoryRegistry | None = None
