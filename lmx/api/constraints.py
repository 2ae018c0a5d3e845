"""Which grammar, if any, a chat request's output must follow: `response_format` and forced tools.

Called by the chat route with the serving engine (the tool-call wrapping depends on the model
family). Invalid schemas become 400s naming the request field; compiling happens in the engine.
"""

from __future__ import annotations

from lmx.api.schemas import AllowedToolsChoice, ChatCompletionRequest, NamedToolChoice
from lmx.errors import RequestError
from lmx.runtime import grammars
from lmx.runtime.engine import Constraint, Engine
from lmx.runtime.parsers import HARMONY

# How each tool-call format writes its calls (the tool parser's key; None: Hermes, the commonest).
_SYNTAXES: dict[str | None, grammars.CallSyntax] = {
    "hermes": grammars.HERMES,
    "mistral": grammars.MISTRAL,
    "llama3": grammars.BARE_JSON,
    # Their own calls are XML, their values untyped text; a grammar makes them write Hermes'
    # JSON, which their parsers read as well, the arguments checked against their schema.
    "qwen3_coder": grammars.HERMES,
    "glm": grammars.HERMES,
    None: grammars.HERMES,
}


def constraint_for(body: ChatCompletionRequest, engine: Engine) -> Constraint | None:
    """The constraint for `body` on `engine`, or None. Raises RequestError naming the field, for
    an invalid tool also when the call is left to the model."""
    choice = body.tool_choice
    tok = engine.tokenizer
    tools = [t.model_dump(exclude_none=True) for t in body.tools or ()]
    if isinstance(choice, AllowedToolsChoice):
        _check_allowed(body, choice)
    if body.forces_call:
        if not body.tools:
            raise RequestError(
                "tool_choice requires tools, but none were given", param="tool_choice"
            )
        allowed = [t.model_dump(exclude_none=True) for t in body.callable_tools]
        named = choice.function.get("name") if isinstance(choice, NamedToolChoice) else None
        if isinstance(choice, NamedToolChoice) and not named:
            raise RequestError("tool_choice names no function", param="tool_choice.function.name")
        try:
            if tok.tool_parser == HARMONY:  # in its own format (see chat_prompt)
                grammar = grammars.harmony_call(allowed, named, token_ids=tok.marker_ids)
            else:
                grammar = grammars.tool_call(
                    allowed,
                    named,
                    _SYNTAXES.get(tok.tool_parser, _SYNTAXES[None]),
                    parallel=body.parallel_tool_calls is not False,
                    token_ids=tok.marker_ids,
                )
        except ValueError as exc:
            raise _tools_error(str(exc), body) from None
        return Constraint(grammar.text)
    try:
        grammars.check_tools(tools)
    except ValueError as exc:
        raise _tools_error(str(exc), body) from None
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return Constraint(grammars.json_object().text)
    spec = fmt.json_schema
    if spec is None or spec.schema_ is None:
        raise RequestError(
            # `field: ...`, as a validation error says it: another API's request renames it.
            "response_format.json_schema.schema: required for type json_schema",
            param="response_format.json_schema.schema",
        )
    try:
        grammar = grammars.json_schema(
            spec.schema_, strict=bool(spec.strict), name=spec.name, markers=tok.marker_ids
        )
    except ValueError as exc:
        raise RequestError(str(exc), param="response_format.json_schema.schema") from None
    return Constraint(grammar.text)


def _check_allowed(body: ChatCompletionRequest, choice: AllowedToolsChoice) -> None:
    """Raises RequestError naming an allowed tool that is not one of the request's tools."""
    given = {t.function.name for t in body.tools or ()}
    for i, tool in enumerate(choice.allowed_tools.tools):
        name = tool.function.get("name")
        if name not in given:
            raise RequestError(
                f"the allowed tool {name!r} is not one of the request's tools",
                param=f"tool_choice.allowed_tools.tools[{i}].function.name",
            )


def _tools_error(message: str, body: ChatCompletionRequest) -> RequestError:
    """The 400 for a tool-call grammar's error, naming the field; a function's bad parameters
    schema has OpenAI's code for it."""
    param = _tools_param(message, body)
    code = "invalid_function_parameters" if param.endswith(".function.parameters") else None
    return RequestError(message, param=param, code=code)


def _tools_param(message: str, body: ChatCompletionRequest) -> str:
    """The request field a tool-call grammar's error is about: the tool it names, else
    tool_choice (an unknown function named there, say)."""
    if message.startswith("tools["):
        return message.split(":")[0]
    for i, tool in enumerate(body.tools or ()):
        if message.startswith(f"function {tool.function.name!r} parameters"):
            return f"tools[{i}].function.parameters"
    return "tool_choice"
