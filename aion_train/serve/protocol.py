"""Request bodies of the OpenAI-compatible API (pydantic, unknown fields refused) and the
errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, WithJsonSchema

MAX_STOP = 4
MAX_N = 16


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# What the OpenAPI schema says of the OpenAI fields this server takes but does not implement
# (check_unsupported refuses other values with a 400 naming the field).
_ONLY_ZERO = {"enum": [0]}
_EMPTY_OR_NULL = {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 0}]}
_NO_BIAS = {"anyOf": [{"type": "null"}, {"type": "object", "maxProperties": 0}]}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class RetrievalRequest(_Strict):
    """Extension: per-request retrieval settings (the server needs --index)."""

    k: Optional[StrictInt] = Field(None, ge=1, le=32)
    alpha: Optional[float] = Field(None, ge=0.0, le=1.0)
    mmr_lambda: Optional[float] = Field(None, ge=0.0, le=1.0)
    rerank: Optional[StrictBool] = None  # reorder the best 2k by the served model's log-likelihood


class IngestDocument(_Strict):
    id: str = Field(min_length=1, max_length=256)
    text: str = Field(max_length=1 << 16)
    meta: Optional[dict] = None


class IngestRequest(_Strict):
    """Body of POST /admin/ingest (a server whose --index is a continual memory): one batch,
    applied all at once."""

    documents: list[IngestDocument] = Field(default_factory=list, max_length=1024)
    delete: list[str] = Field(default_factory=list, max_length=1024)


class _Sampling(_Strict):
    model: str
    max_tokens: Optional[StrictInt] = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(0, ge=-1)  # extension (as vLLM): 0/-1 = off
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[StrictInt] = None
    user: Optional[str] = Field(None, max_length=256)
    presence_penalty: float = Field(0.0, json_schema_extra=_ONLY_ZERO)
    frequency_penalty: float = Field(0.0, json_schema_extra=_ONLY_ZERO)
    jurisdiction: Optional[str] = Field(None, max_length=90)  # extension (or X-Jurisdiction)
    retrieval: Optional[RetrievalRequest] = None  # extension

    def stops(self) -> tuple[str, ...]:
        s = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(s) > MAX_STOP:
            raise APIError(400, f"at most {MAX_STOP} stop sequences, got {len(s)}", param="stop")
        if any(not x for x in s):
            raise APIError(400, "stop sequences must not be empty", param="stop")
        return tuple(s)

    def check_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0.0:
                raise APIError(400, f"{name} is not supported by this server (only 0)", param=name)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[StrictInt], list[list[StrictInt]]]
    echo: StrictBool = False
    logprobs: Optional[StrictInt] = Field(None, ge=0, le=20)
    best_of: Optional[StrictInt] = None
    suffix: Annotated[Optional[str], WithJsonSchema(_EMPTY_OR_NULL)] = None
    logit_bias: Annotated[Optional[dict], WithJsonSchema(_NO_BIAS)] = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of is not supported by this server", param="best_of")
        if self.suffix:
            raise APIError(400, "suffix is not supported by this server", param="suffix")
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


CHAT_ROLES = ("system", "developer", "user", "assistant")
MEDIA_PART_TYPES = ("image_url", "input_audio", "video")


def _part(kind: str, body: dict) -> dict:
    return {
        "type": "object",
        "properties": {"type": {"type": "string", "enum": [kind]}, kind: body},
        "required": ["type", kind],
        "additionalProperties": False,
    }


_DATA_URL = {"type": "string", "description": "a base64 data: URL (data:image/png;base64,...); nothing is fetched"}
_IMAGE_PART = _part(
    "image_url",
    {
        "type": "object",
        "properties": {"url": _DATA_URL, "detail": {"type": "string", "enum": ["auto", "low", "high"]}},
        "required": ["url"],
        "additionalProperties": False,
    },
)
_AUDIO_PART = _part(
    "input_audio",
    {
        "type": "object",
        "properties": {"data": {"type": "string"}, "format": {"type": "string", "enum": ["wav"]}},
        "required": ["data", "format"],
        "additionalProperties": False,
    },
)
_VIDEO_PART = _part("video", {"type": "array", "items": _DATA_URL, "minItems": 1, "maxItems": 64})
# what the server accepts: text parts, and media parts for a multimodal model (serve/mm_prompt.py);
# the field itself takes any parts, to name a bad one
_CONTENT_SCHEMA = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"anyOf": [TextPart.model_json_schema(), _IMAGE_PART, _AUDIO_PART, _VIDEO_PART]}},
        {"type": "null"},
    ]
}


class ChatMessage(_Strict):
    role: str = Field(json_schema_extra={"enum": list(CHAT_ROLES)})
    content: Annotated[Union[str, list[dict], None], WithJsonSchema(_CONTENT_SCHEMA)] = None
    name: Optional[str] = Field(None, max_length=64)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=0)
    logprobs: StrictBool = False
    top_logprobs: Optional[StrictInt] = Field(None, ge=0, le=20)
    logit_bias: Annotated[Optional[dict], WithJsonSchema(_NO_BIAS)] = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")

    def _check_roles(self) -> None:
        for i, m in enumerate(self.messages):
            if m.role not in CHAT_ROLES:
                raise APIError(
                    400,
                    f"messages[{i}].role {m.role!r} is not supported ({', '.join(CHAT_ROLES)})",
                    param=f"messages.{i}.role",
                )

    def part_messages(self) -> list[dict]:
        """[{role, content: str | parts | None}] as sent (roles checked), for a multimodal model."""
        self._check_roles()
        return [{"role": m.role, "content": m.content} for m in self.messages]

    def plain_messages(self) -> list[dict]:
        """[{role, content: str}] for the chat template; content parts must be text (a media
        part: 400 media_unsupported, this is a text-only model)."""
        self._check_roles()
        out = []
        for i, m in enumerate(self.messages):
            role = "system" if m.role == "developer" else m.role
            if isinstance(m.content, list):
                texts = []
                for k, part in enumerate(m.content):
                    try:
                        texts.append(TextPart.model_validate(part).text)
                    except ValidationError:
                        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                        if kind in MEDIA_PART_TYPES:
                            raise APIError(
                                400,
                                f"messages[{i}].content[{k}]: a {kind!r} part was sent to a text-only model; "
                                "media need a multimodal checkpoint",
                                param=f"messages.{i}.content.{k}",
                                code="media_unsupported",
                            ) from None
                        raise APIError(
                            400,
                            f"messages[{i}].content[{k}]: content parts of type {kind!r} are not supported (text only)",
                            param=f"messages.{i}.content.{k}",
                        ) from None
                content = "".join(texts)
            else:
                content = m.content or ""
            out.append({"role": role, "content": content})
        return out


def openapi_body(body: type[BaseModel], properties: dict | None = None) -> dict:
    """A route's `openapi_extra` that documents its JSON body: `model`'s JSON schema (nested
    models inlined), with `properties` replaced (the served model id as the only
    `model`, say). The routes read and validate bodies themselves (for OpenAI-shaped errors);
    this only makes the app's OpenAPI schema say what they accept."""
    schema = body.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(x):
        if isinstance(x, dict):
            if "$ref" in x:
                return inline(defs[x["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in x.items()}
        if isinstance(x, list):
            return [inline(v) for v in x]
        return x

    schema = inline(schema)
    schema["properties"].update(properties or {})
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def validation_error(e: ValidationError) -> APIError:
    """The first problem of a pydantic error, in OpenAI's words."""
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err.get("loc", ()))
    if err.get("type") == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {loc}", param=loc, code="unknown_parameter")
    if err.get("type") == "missing":
        return APIError(400, f"Missing required parameter: {loc}", param=loc, code="missing_required_parameter")
    return APIError(400, f"Invalid value for {loc}: {err.get('msg')}", param=loc, code="invalid_value")
