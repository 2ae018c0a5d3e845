"""The one exception tree of lmx. Every error lmx raises on purpose descends from `LmxError`.

    LmxError
    ├── ConfigError              a desired-state file or patch is invalid (names the field path)
    ├── GenerationFailed         a request's generation failed once under way (its worker died)
    ├── TemporaryError(delay_s)  retry later: transient I/O, busy engine, memory not yet freed
    │   └── QueueFull            a model's request queue is full (HTTP 429 with Retry-After)
    └── PermanentError           retrying cannot help until the spec changes
        ├── ModelNotFound        no model with that id or alias is being served
        ├── ResponseNotFound     no kept /v1/responses answer has that id (HTTP 404)
        └── RequestError         a request is invalid for the model (HTTP 400; names the param)

The executor turns these into outcomes; the API turns them into OpenAI error envelopes.
"""

from __future__ import annotations


class LmxError(Exception):
    """Root of every error lmx raises on purpose."""


class ConfigError(LmxError):
    """The desired state is invalid. `errors` holds one line per problem, each naming a field path."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: " + "; ".join(errors))


class GenerationFailed(LmxError):
    """The engine ended a sequence with an error after taking it in: its worker process died, or
    its output could not be made. The message is the engine's reason."""


class TemporaryError(LmxError):
    """Retry after `delay_s` seconds; the same action may succeed then."""

    def __init__(self, message: str, *, delay_s: float = 1.0) -> None:
        self.delay_s = delay_s
        super().__init__(message)


class QueueFull(TemporaryError):
    """The model's bounded request queue is full."""


class PermanentError(LmxError):
    """Retrying cannot help until the desired state changes. `code`: why, for scripts (the
    error envelope's `code`), e.g. `exceeds_budget`."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        self.code = code
        super().__init__(message)


class ModelNotFound(PermanentError):
    """No model with this id or alias is declared, or it cannot be served now."""

    def __init__(self, model: str, available: list[str]) -> None:
        self.model = model
        known = ", ".join(sorted(available)) or "none"
        super().__init__(f"model {model!r} not found; available: {known}")


class ResponseNotFound(PermanentError):
    """No stored response has this id (never stored, deleted, or forgotten)."""

    def __init__(self, response_id: str) -> None:
        self.response_id = response_id
        super().__init__(f"Response with id {response_id!r} not found.")


class RequestError(PermanentError):
    """A request is invalid: `param` names the offending request field."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        self.param = param
        super().__init__(message, code=code)
