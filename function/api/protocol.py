"""OpenAI chat-completions wire format (pydantic v2), the error shape, and the request's mapping to engine params.

Requests accept unknown fields (OpenAI clients add new ones all the time; a 422 for them would break clients) and
log them at debug. Ranges follow OpenAI's documentation; vLLM's extra sampling fields are accepted too. No FastAPI,
no torch: the same models serve HTTP, CloudEvents and tests.

Hostile input stops here, as a 400: non-finite numbers (JSON's NaN/Infinity, which Python's parser accepts), text
that is not valid Unicode (lone surrogate escapes such as "\\ud800", which would fail only when the text is encoded
again, deep inside), integers the engine's tensors cannot hold, and lists whose length would cost the event loop or
the per-token stop-string check (MAX_MESSAGES, MAX_CONTENT_PARTS, MAX_STOP, MAX_STOP_CHARS) more than any real
request needs.
"""
from __future__ import annotations

import logging
import re
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator,
                      model_validator)

from function.engine.protocol import SamplingParams

log = logging.getLogger(__name__)

_INT64 = 2**63
MAX_MESSAGES = 2048         # far more than any context holds; validating a million takes the event loop seconds
MAX_CONTENT_PARTS = 512     # parts in one message
MAX_STOP = 16               # stop strings: each is checked against the text after every token
MAX_STOP_CHARS = 256
_SURROGATE = re.compile("[\ud800-\udfff]")
_StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


def _is_none(v: Any) -> bool:
    return v is None


def omitted() -> Any:
    """An optional response field left out of the JSON when None (OpenAI omits such fields rather than sending
    null)."""
    return Field(default=None, exclude_if=_is_none)


class OpenAIRequestModel(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @model_validator(mode="after")
    def _log_ignored(self):
        if self.model_extra:
            log.debug("%s: ignoring unsupported fields %s", type(self).__name__, sorted(self.model_extra))
        return self


# --- request
class ImageURL(OpenAIRequestModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(OpenAIRequestModel):
    type: Literal["text"]
    text: str


class ImagePart(OpenAIRequestModel):
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _url_string(cls, v: Any) -> Any:
        return {"url": v} if isinstance(v, str) else v   # vLLM also accepts the bare URL string


class InputAudio(OpenAIRequestModel):
    data: str           # base64; the format and size are checked when it is decoded (function/audio.py)
    format: str         # OpenAI documents "wav" and "mp3"; what this server decodes: audio.FORMATS


class AudioPart(OpenAIRequestModel):
    """Speech; the speech-to-text stage replaces it with its transcript (function/asr.py, docs/voice.md)."""
    type: Literal["input_audio"]
    input_audio: InputAudio


def _part_type(v: Any) -> str | None:
    t = v.get("type") if isinstance(v, dict) else getattr(v, "type", None)
    return _PART_TAGS.get(t) if isinstance(t, str) else None     # any JSON value may come here: [] is unhashable


_PART_TAGS = {"text": "TextPart", "image_url": "ImagePart", "input_audio": "AudioPart"}


# Capitalised tags: error locations then tell field names (lowercase) from the union member tried.
ContentPart = Annotated[
    Annotated[TextPart, Tag("TextPart")] | Annotated[ImagePart, Tag("ImagePart")]
    | Annotated[AudioPart, Tag("AudioPart")],
    Discriminator(_part_type, custom_error_type="invalid_content_part",
                  custom_error_message="content parts must have type 'text', 'image_url' or 'input_audio'"),
]


class ChatMessage(OpenAIRequestModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_CONTENT_PARTS)] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _check_content(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.role != "user" and isinstance(self.content, list) and \
                any(isinstance(p, ImagePart) for p in self.content):
            raise ValueError(f"images are only accepted in user messages, not in {self.role} messages")
        if self.role != "user" and isinstance(self.content, list) and \
                any(isinstance(p, AudioPart) for p in self.content):
            raise ValueError(f"audio is only accepted in user messages, not in {self.role} messages")
        return self

    def text(self) -> str:
        """The content as one string (system/developer/assistant content: the model's template wants a string)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content if isinstance(p, TextPart))


class StreamOptions(OpenAIRequestModel):
    include_usage: bool = False


# Arguments that `apply_chat_template` itself takes: a client must not be able to override them.
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs", "processor_kwargs", "images", "videos",
})


class ChatCompletionRequest(OpenAIRequestModel):
    # https://platform.openai.com/docs/api-reference/chat/create
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    stop: _StopString | list[_StopString] | None = None
    seed: int | None = Field(default=None, ge=-_INT64, lt=_INT64)
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logprobs: bool | None = False
    tool_choice: str | dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None      # after tool_choice: its validator reads tool_choice
    response_format: dict[str, Any] | None = None

    # vLLM extensions
    top_k: int | None = Field(default=None, ge=-1, lt=_INT64)
    repetition_penalty: float | None = Field(default=None, gt=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    # AutoGLM deployment-guide extensions (also accepted inside chat_template_kwargs)
    enable_thinking: bool | None = None
    return_reasoning: bool | None = None

    # voice: include the transcripts of input_audio parts in the response (docs/voice.md)
    return_transcript: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = _lone_surrogate(data)
        if where is not None:
            raise ValueError(f"{where or 'the request'} is not valid Unicode: it has a lone surrogate escape "
                             "(\\ud800-\\udfff not in a pair)")
        return data

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError(f"n={v} is not supported: this server returns exactly one choice (n must be 1)")
        return v

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if v is not None and any(s == "" for s in ([v] if isinstance(v, str) else v)):
            raise ValueError("stop strings must not be empty")
        if isinstance(v, list) and len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings are supported, not {len(v)}")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("logprobs are not supported by this server")
        return v

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and v.get("type", "text") != "text":
            raise ValueError(f"response_format type {v.get('type')!r} is not supported (only 'text')")
        return v

    @field_validator("chat_template_kwargs")
    @classmethod
    def _no_reserved(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        bad = sorted(set(v or ()) & _RESERVED_TEMPLATE_KWARGS)
        if bad:
            raise ValueError(f"{', '.join(bad)} cannot be set through chat_template_kwargs")
        return v

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v: list[dict[str, Any]] | None, info: ValidationInfo) -> list[dict[str, Any]] | None:
        if v and info.data.get("tool_choice") != "none":
            raise ValueError("tools are not supported by this server (AutoGLM writes its actions in <answer>)")
        return v

    @property
    def return_reasoning_enabled(self) -> bool:
        """Split `<think>` reasoning into `reasoning_content` (top-level flag wins over chat_template_kwargs)."""
        if self.return_reasoning is not None:
            return self.return_reasoning
        return bool((self.chat_template_kwargs or {}).get("return_reasoning", False))

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def template_kwargs(self) -> dict[str, Any]:
        """Chat-template variables for the engine: the client's, with the top-level `enable_thinking` applied."""
        kw = {k: v for k, v in (self.chat_template_kwargs or {}).items() if k != "return_reasoning"}
        if self.enable_thinking is not None:
            kw["enable_thinking"] = self.enable_thinking
        return kw

    def to_sampling_params(self, default_max_tokens: int | None = None) -> SamplingParams:
        """The engine's params; what the request leaves unset keeps SamplingParams' defaults."""
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        given = {
            "max_tokens": self.max_completion_tokens or self.max_tokens or default_max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": None if self.top_k is None else max(self.top_k, 0),   # vLLM: -1 and 0 both mean off
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
            "stop": tuple(stop),
            "stop_token_ids": tuple(self.stop_token_ids or ()),
            "ignore_eos": self.ignore_eos,
            "skip_special_tokens": self.skip_special_tokens,
        }
        return SamplingParams(**{k: v for k, v in given.items() if v is not None})


def _lone_surrogate(data: Any) -> str | None:
    """Where in the parsed JSON `data` a string (or key) holds a UTF-16 surrogate, or None. Iterative (no recursion
    limit) and cheap for the bulk of a request: ASCII strings (base64 images) are skipped in O(1)."""
    stack: list[tuple[Any, tuple]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if not value.isascii() and _SURROGATE.search(value):
                return _path(path)
        elif isinstance(value, dict):
            for k, v in value.items():
                if isinstance(k, str) and not k.isascii() and _SURROGATE.search(k):
                    return _path(path)
                if isinstance(v, (str, dict, list)):
                    stack.append((v, (path, k)))
        elif isinstance(value, list):
            stack.extend((v, (path, i)) for i, v in enumerate(value) if isinstance(v, (str, dict, list)))
    return None


def _path(linked: tuple) -> str:
    """`((((), "messages"), 0), "content")` -> `messages[0].content`."""
    parts = []
    while linked:
        linked, key = linked
        parts.append(key)
    out = ""
    for key in reversed(parts):
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else str(key))
    return out


# --- responses
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    reasoning_content: str | None = omitted()


FinishReason = Literal["stop", "length"]


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason
    stop_reason: int | str | None = None   # vLLM: the stop string or token id that ended the completion


class AudioTranscript(BaseModel):
    """What the speech-to-text stage heard in one input_audio part (an extension field, docs/voice.md)."""
    message_index: int      # messages[message_index].content[content_index] was the audio part
    content_index: int
    text: str               # what replaced the part in the prompt
    language: str | None = omitted()     # ISO 639-1 code, configured (ASR_LANGUAGE) or detected
    duration: float         # seconds of audio


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[Choice]
    usage: Usage
    transcripts: list[AudioTranscript] | None = omitted()   # with return_transcript / RETURN_TRANSCRIPT


class Delta(BaseModel):
    role: Literal["assistant"] | None = omitted()
    content: str | None = omitted()
    reasoning_content: str | None = omitted()


class StreamChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = omitted()


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[StreamChoice]
    usage: Usage | None = omitted()
    transcripts: list[AudioTranscript] | None = omitted()   # on the first chunk, as in ChatCompletionResponse


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "autoglm"
    root: str
    max_model_len: int | None = omitted()


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
