"""OpenAI wire schemas for /v1: requests are validated here, responses are built from these.

Requests ignore fields lmx does not know (clients send vendor extensions); fields it knows are
validated with the OpenAI names and ranges, so a 400 names the offending `param`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from lmx.api.freeform import chat_as_functions
from lmx.api.legacy_functions import functions_as_tools
from lmx.errors import RequestError
from lmx.runtime.sampling import MinP, RepetitionPenalty, Temperature, TopK, TopP

# A UTF-16 surrogate: in a string JSON gave, one that no pair made a character (JSON may write
# it as `\ud800`). It is no Unicode text, and no tokenizer takes it.
_SURROGATE = re.compile("[\ud800-\udfff]")


class _Request(BaseModel):
    # NaN and Infinity, which Python's JSON reads, are no numbers a request may give (a NaN
    # temperature was refused as "less than or equal to 2").
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class _Body(_Request):
    """A request's whole body: besides its fields, every string in it must be Unicode text."""

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data: Any) -> Any:
        """Raises RequestError naming the first string (or key) that holds a lone surrogate."""
        stack: list[tuple[Any, str]] = [(data, "")]
        while stack:
            value, at = stack.pop()
            if isinstance(value, str):
                if value.isascii() or (lone := _SURROGATE.search(value)) is None:
                    continue
                raise RequestError(
                    f"{at or 'body'} holds a lone UTF-16 surrogate (\\u{ord(lone[0]):04x}) at "
                    f"character {lone.start()}: no Unicode text, which a model could read",
                    param=at or None,
                )
            if isinstance(value, dict):
                fields = [(f"{at}.{k}" if at else str(k), k, v) for k, v in value.items()]
                stack += [(x, f) for f, k, v in reversed(fields) for x in (v, k)]
            elif isinstance(value, list):  # of texts or objects; not a prompt's token ids
                items = [(i, v) for i, v in enumerate(value) if isinstance(v, str | dict | list)]
                stack += [(v, f"{at}[{i}]") for i, v in reversed(items)]
        return data


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow")


class FunctionDef(_Wire):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Wire):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(_Wire):
    type: Literal["function"] = "function"
    function: dict[str, str]


class AllowedTools(_Wire):
    """The tools the model may call, of those given (which all stay in the prompt where it can,
    for the prompt cache); `auto`: or answer in text, `required`: one of them."""

    mode: Literal["auto", "required"]
    tools: Annotated[list[NamedToolChoice], Field(min_length=1)]


class AllowedToolsChoice(_Wire):
    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


class StreamOptions(_Request):
    include_usage: bool = False


class JsonSchemaFormat(_Wire):
    name: str = "response"
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


UNLIMITED = -1  # max_tokens: as many as the context leaves, as LM Studio reads it


# LM Studio's: seconds a model loaded for the request (`want: downloaded`, whose spec sets no
# idle_ttl) may then sit idle before it is unloaded.
Ttl = Annotated[float | None, Field(gt=0)]


class SamplingFields(_Body):
    """Fields shared by chat and text completions, with OpenAI's ranges plus vLLM's extensions."""

    model: str
    # -1, as LM Studio's documentation sends it: as many as the context leaves (see UNLIMITED).
    max_tokens: Annotated[int | None, Field(ge=UNLIMITED)] = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    n: Annotated[int, Field(ge=1, le=16)] = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: Annotated[float | None, Field(ge=-2, le=2)] = None
    frequency_penalty: Annotated[float | None, Field(ge=-2, le=2)] = None
    # vLLM's name, and LM Studio's (its documented `repeat_penalty`).
    repetition_penalty: Annotated[
        RepetitionPenalty | None,
        Field(validation_alias=AliasChoices("repetition_penalty", "repeat_penalty")),
    ] = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extensions that benchmark clients send.
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0)] = 0
    ttl: Ttl = None


class CalledFunction(_Wire):
    name: str
    # A JSON object serialized, as the API gave it; an object as such is taken too (as peers do).
    arguments: str | dict[str, Any]


class MessageToolCall(_Wire):
    """A call an assistant message made, as a client sends it back."""

    id: str
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(_Wire):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None  # the same, by the name LM Studio and vLLM answer it with

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        """Only an assistant's message may go without content (its tool calls stand for it)."""
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int | None, Field(ge=1)] = None
    logprobs: bool = False
    top_logprobs: Annotated[int | None, Field(ge=0, le=20)] = None
    tools: list[ToolDef] | None = None
    tool_choice: (
        Literal["none", "auto", "required"] | NamedToolChoice | AllowedToolsChoice | None
    ) = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    # Given to the chat template by that name; none also as `enable_thinking: false`, the switch
    # of Qwen3's and other hybrid models' templates.
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    # vLLM's: the most tokens the model's reasoning may take before its end is written for it.
    thinking_token_budget: Annotated[int | None, Field(ge=0)] = None
    chat_template_kwargs: dict[str, Any] | None = None
    # vLLM's: the answer continues the last message, an assistant's (a prefill), instead of
    # starting a turn of its own; `add_generation_prompt: false` leaves the new turn unopened.
    continue_final_message: bool = False
    add_generation_prompt: bool = True
    # Its custom tools' names, set from them (not a field of the API's): they reach the model as
    # functions of one string (lmx.api.freeform), their calls go back to the client as theirs.
    custom_tool_names: SkipJsonSchema[frozenset[str]] = frozenset()

    # Set when it came with OpenAI's deprecated `functions` (lmx.api.legacy_functions): its
    # answer goes back in that API's shape.
    legacy_functions: SkipJsonSchema[bool] = False

    @model_validator(mode="before")
    @classmethod
    def _custom_tools(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return chat_as_functions(functions_as_tools(data))

    @property
    def forces_call(self) -> bool:
        """Whether its answer must be a tool call (`required`, a named function, or allowed
        tools in mode `required`)."""
        choice = self.tool_choice
        if isinstance(choice, AllowedToolsChoice):
            return choice.allowed_tools.mode == "required"
        return choice == "required" or isinstance(choice, NamedToolChoice)

    @property
    def callable_tools(self) -> list[ToolDef]:
        """The tools the model may call: those `tool_choice` allows, else all of them."""
        choice = self.tool_choice
        if not isinstance(choice, AllowedToolsChoice):
            return list(self.tools or ())
        names = {t.function.get("name") for t in choice.allowed_tools.tools}
        return [t for t in self.tools or () if t.function.name in names]

    @field_validator("max_tokens")
    @classmethod
    def _some_tokens(cls, v: int | None) -> int | None:
        if v == 0:
            raise ValueError("max_tokens must be at least 1 (or -1: as many as the context leaves)")
        return v

    @model_validator(mode="after")
    def _continues_an_assistant(self) -> ChatCompletionRequest:
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ValueError(
                "continue_final_message needs the last message to be the assistant's, "
                f"not the {self.messages[-1].role}'s"
            )
        return self


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    # 0: the echoed prompt alone, scored; -1: as many as the context leaves
    max_tokens: Annotated[int | None, Field(ge=UNLIMITED)] = None
    logprobs: Annotated[int | None, Field(ge=0, le=20)] = None
    echo: bool = False
    suffix: str | None = None
    best_of: Annotated[int | None, Field(ge=1)] = None


class EmbeddingRequest(_Body):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int | None, Field(ge=1)] = None
    user: str | None = None
    ttl: Ttl = None

    @field_validator("input", mode="wrap")
    @classmethod
    def _one_of_the_forms(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """One error naming the forms, not one per member of the union."""
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(
                "give a text, a list of texts, a list of token ids, or a list of lists of them"
            ) from None


class ResponsesRequest(_Body):
    """OpenAI's Responses API, as lmx serves it (lmx.api.responses): items and formats are
    checked where they are turned into a chat request, so a 400 names the item."""

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    max_output_tokens: Annotated[int | None, Field(ge=1)] = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_logprobs: Annotated[int | None, Field(ge=0, le=20)] = None
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None


class NativeChatRequest(_Body):
    """LM Studio's `POST /api/v1/chat`. `context_length` is accepted and left to the model's
    spec: lmx loads a model once, with the context its spec names, for every client."""

    model: str
    # Text, or LM Studio's input items: {"type": "message", "content"} or {"type": "image",
    # "data_url"} (checked where they become the user's message, so a 400 names the item).
    input: str | Annotated[list[Any], Field(min_length=1)]
    system_prompt: str | None = None
    integrations: list[Any] | None = None
    stream: bool = False
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int | None, Field(ge=0)] = None
    min_p: MinP | None = None
    repeat_penalty: Annotated[float | None, Field(gt=0)] = None
    max_output_tokens: Annotated[int | None, Field(ge=1)] = None
    reasoning: Literal["off", "low", "medium", "high", "on"] | None = None
    context_length: Annotated[int | None, Field(ge=1)] = None
    store: bool = True
    previous_response_id: str | None = None


class NativeLoadRequest(_Body):
    """LM Studio's `POST /api/v1/models/load`: the model, and settings lmx takes from its spec."""

    model: str


class CountTokensRequest(_Body):
    """Anthropic's `/v1/messages/count_tokens`: what a Messages request's prompt is made of.
    Content blocks, tools and the tool choice are checked where they are turned into a chat
    request (lmx.api.messages), so a 400 names the block."""

    model: str
    messages: Annotated[list[dict[str, Any]], Field(min_length=1)]
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None
    output_format: dict[str, Any] | None = None  # output_config.format, by its earlier name


class MessagesRequest(CountTokensRequest):
    """Anthropic's Messages API, as lmx serves it (lmx.api.messages), with Anthropic's ranges
    (temperature up to 1)."""

    max_tokens: Annotated[int, Field(ge=1)]
    stop_sequences: list[str] | None = None
    temperature: Annotated[float | None, Field(ge=0, le=1)] = None
    top_p: Annotated[float | None, Field(ge=0, le=1)] = None
    top_k: Annotated[int | None, Field(ge=0)] = None
    stream: bool = False
    metadata: dict[str, Any] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lmx"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(BaseModel):
    error: ErrorBody


def param_of(loc: tuple[int | str, ...]) -> str | None:
    """A validation error's location as a field path: `tools[0].function.parameters`; a query's
    or a path's parameter by its name. The members of a union that pydantic names in it (`str`,
    `list[dict[str,any]]`, `NamedToolChoice`) are no fields and are left out."""
    if loc and loc[0] in ("body", "query", "path"):
        loc = loc[1:]
    parts = [str(p) for p in loc if not _union_member(p)]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or None


def _union_member(part: int | str) -> bool:
    return isinstance(part, str) and (
        part in ("str", "int", "float", "bool") or "[" in part or part[:1].isupper()
    )
