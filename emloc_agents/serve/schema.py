"""The OpenAI Chat Completions request and response shapes the server reads and writes.

Requests are validated strictly on the fields the server uses (a wrong type is a 422 naming the
field) and loosely elsewhere: clients send fields of their own (``user``, ``metadata``, ``store``), so
unknown fields are accepted and ignored. Fields the server cannot honour are refused when set to
anything but their neutral value (``UNSUPPORTED``), rather than silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class FunctionCall(_Open):
    name: StrictStr
    arguments: StrictStr = "{}"


class ToolCall(_Open):
    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class ImageURL(_Open):
    url: StrictStr
    detail: StrictStr | None = None


class TextPart(_Open):
    type: Literal["text"]
    text: StrictStr


class ImagePart(_Open):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Open):
    """One message of the conversation (``developer`` is read as ``system``)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: StrictStr | None = None


class FunctionSpec(_Open):
    name: StrictStr = Field(min_length=1, max_length=128)
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(_Open):
    type: Literal["function"]
    function: FunctionSpec


class FunctionCallName(_Open):
    name: StrictStr


class NamedToolChoice(_Open):
    type: Literal["function"]
    function: FunctionCallName


class JSONSchemaFormat(_Open):
    name: StrictStr = "response"
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StreamOptions(_Open):
    include_usage: StrictBool = False


class ChatCompletionRequest(_Open):
    """``POST /v1/chat/completions``. ``skill`` (an extra body field) or ``model="<base>:<skill>"``
    choose the skill; neither: zero-shot."""

    model: StrictStr
    messages: list[Message] = Field(min_length=1)
    skill: StrictStr | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: StrictFloat | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: StrictFloat | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = Field(default=None, ge=-(2**63), lt=2**63)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    response_format: ResponseFormat | None = None
    n: StrictInt | None = Field(default=None, ge=1)


UNSUPPORTED: dict[str, Any] = {
    # field -> its neutral values: anything else is refused with a 400 naming the field
    "n": (None, 1),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "audio": (None,),
    "prediction": (None,),
    "modalities": (None, ["text"]),
    "functions": (None, []),
    "function_call": (None,),
}


# ---- responses ----------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0
    """Tokens served from the skill's compressed memory (its tokens as the model reads them)."""


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorBody

