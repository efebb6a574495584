"""OpenAI request bodies (validated) and response/chunk builders for completions and chat.

Validation is strict, as OpenAI's is: `"max_tokens": "16"`, `"max_tokens": true` and `"stream": "yes"`
are refused, not coerced; floats must be finite (Python's json reads `NaN` and `Infinity`); every
integer fits the wire field it travels in (limits.py). What OpenAI defines but this server does not
do is refused by name (unsupported.py); fields nobody defines are ignored.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from .errors import ApiError, bad_request
from .limits import INT32_MAX, INT64_MAX, INT64_MIN, UINT32_MAX, check_unicode, decode_json_text
from .unsupported import note_unknown, refuse_unsupported

_STRICT = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
TokenId = Annotated[int, Field(ge=0, le=UINT32_MAX)]
PROMPT_SHAPES = ("a string, a list of token ids, or a list holding one string or one list of token ids "
                 "(token ids: integers from 0 up to the model's vocabulary size)")
Stop = Annotated[str, Field(min_length=1)]


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool | None = True


class _Common(BaseModel):
    model_config = _STRICT
    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=UINT32_MAX)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0,
                                      description="default 1; below 1e-5 it is greedy")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, description="default 1")
    top_k: int | None = Field(default=None, ge=0, le=INT32_MAX, description="extension (as vLLM); 0 = off")
    n: int | None = Field(default=None, ge=1, json_schema_extra={"maximum": 1})
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stop: Stop | Annotated[list[Stop], Field(max_length=4)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    service_tier: str | None = None
    ignore_eos: bool | None = Field(default=None, description="extension: do not stop at end-of-sequence")
    return_token_ids: bool | None = Field(default=None, description="extension (as vLLM): each choice also "
                                          "carries the ids of its tokens, `token_ids`")
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None

    @field_validator("stop", mode="wrap")
    @classmethod
    def _stops(cls, v: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(v)
        except ValidationError:  # one error per member of the union: say what stop takes instead
            raise ValueError("stop takes a string or a list of up to 4 strings, none of them empty") from None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int | None) -> int | None:
        if v is not None and v > 1:
            raise ValueError(f"more than one choice per request is not supported by this server (n={v}); "
                             "use n=1")
        return v

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return self.stream_options is None or self.stream_options.include_usage is not False


class CompletionRequest(_Common):
    prompt: (str | Annotated[list[TokenId], Field(min_length=1)]
             | Annotated[list[str], Field(min_length=1, max_length=1)]
             | Annotated[list[list[TokenId]], Field(min_length=1, max_length=1)])
    logprobs: int | None = Field(default=None, ge=0, json_schema_extra={"maximum": 0},
                                 description="only 0 is supported")

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_shape(cls, v: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(v)
        except ValidationError:  # one error per member of the union: say what a prompt is instead
            raise ValueError(f"a prompt is {PROMPT_SHAPES}") from None

    def prompt_value(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and isinstance(p[0], (str, list)):
            return p[0]  # one prompt per request: the schema allows a list of exactly one
        return p


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


def _content_unless_assistant(schema: dict[str, Any]) -> None:
    schema["if"] = {"properties": {"role": {"const": "assistant"}}}
    schema["else"] = {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}}


class ChatMessage(BaseModel):
    model_config = ConfigDict(**_STRICT, json_schema_extra=_content_unless_assistant)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    @field_validator("content", mode="wrap")
    @classmethod
    def _text_only(cls, v: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(v)
        except ValidationError:  # one error per member of the union: say what content takes instead
            raise ValueError('content is a string or a list of {"type": "text", "text": "..."} parts; '
                             "only text content is supported") from None

    @model_validator(mode="after")
    def _content_where_required(self) -> ChatMessage:
        # Only an assistant turn may omit content (OpenAI: it then carries tool calls instead).
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs 'content'")
        return self

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=UINT32_MAX)
    logprobs: bool | None = Field(default=None, json_schema_extra={"not": {"const": True}},
                                  description="only false is supported")

    @property
    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def template_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


# Names a 400's `param` may hold; pydantic's locations also name union members ("str", "list[int]").
_FIELD_NAMES = {name for m in (CompletionRequest, ChatCompletionRequest, ChatMessage, StreamOptions, TextPart)
                for name in m.model_fields}


def parse_body(raw: bytes, model: type[_Common]) -> Any:
    """JSON body -> validated request, or a 400 that names the offending field.

    CPU work in proportion to the body (up to `GatewayConfig.max_body_bytes`): run it off the event loop.
    """
    text = decode_json_text(raw)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise bad_request(f"request body is not valid JSON: {e}", code="invalid_json") from e
    except ValueError as e:  # Python refuses to read an integer of more than 4300 digits
        raise bad_request("request body holds a number too long to read", code="invalid_json") from e
    if not isinstance(doc, dict):
        raise bad_request("request body must be a JSON object", code="invalid_json")
    check_unicode(text, doc)
    try:
        body = model.model_validate(doc)
    except ValidationError as e:
        raise _invalid(e) from e
    refuse_unsupported(doc)
    note_unknown(doc, model.model_fields)
    return body


def _invalid(e: ValidationError) -> ApiError:
    first = e.errors()[0]
    param = ".".join(str(x) for x in first["loc"] if isinstance(x, int) or x in _FIELD_NAMES) or None
    message = str(first["msg"]).removeprefix("Value error, ")
    kind = "missing_required_parameter" if first["type"] == "missing" else "invalid_value"
    return ApiError(400, f"{param}: {message}" if param else message, "invalid_request_error", param, kind)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ResponseShape:
    """Builds OpenAI bodies and chunks for one request (completion or chat)."""

    def __init__(self, request_id: str, model: str, tier: str, chat: bool, token_ids: bool = False) -> None:
        self.id = request_id
        self.model = model
        self.tier = tier
        self.chat = chat
        self.token_ids = token_ids  # return_token_ids: each choice carries its tokens' ids
        self.created = int(time.time())

    def _envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "service_tier": self.tier, "system_fingerprint": None}

    def full(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
             ids: list[int] | None = None) -> dict[str, Any]:
        if self.chat:
            body = self._envelope("chat.completion")
            body["choices"] = [{"index": 0, "message": {"role": "assistant", "content": text},
                                "logprobs": None, "finish_reason": finish_reason}]
        else:
            body = self._envelope("text_completion")
            body["choices"] = [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]
        if self.token_ids:
            body["choices"][0]["token_ids"] = list(ids or [])
        body["usage"] = usage(prompt_tokens, completion_tokens)
        return body

    def chunk(self, text: str, finish_reason: str | None = None, first: bool = False,
              ids: list[int] | None = None) -> bytes:
        if self.chat:
            body = self._envelope("chat.completion.chunk")
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
            if finish_reason is not None and not text:
                delta = {}
            body["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        else:
            body = self._envelope("text_completion")
            body["choices"] = [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]
        if self.token_ids:
            body["choices"][0]["token_ids"] = list(ids or [])
        return f"data: {json.dumps(body)}\n\n".encode()

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion")
        body["choices"] = []
        body["usage"] = usage(prompt_tokens, completion_tokens)
        return f"data: {json.dumps(body)}\n\n".encode()


DONE = b"data: [DONE]\n\n"
