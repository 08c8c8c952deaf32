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
from typing import Annotated, Any, Callable, ClassVar, Literal

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator,
                      model_validator)
from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

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
    continuous_usage_stats: bool = False     # vLLM: usage on every chunk too (with include_usage)


# Arguments that `apply_chat_template` itself takes: a client must not be able to override them.
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs", "processor_kwargs", "images", "videos",
})

MAX_N = 16                  # choices per request: each is a sequence in the batch
MAX_TOP_LOGPROBS = 20       # OpenAI's and vLLM's limit
MAX_LOGIT_BIAS = 1024       # entries; each becomes one element of a per-slot table on the device
MAX_TOKEN_ID_LIST = 65536   # allowed_token_ids / stop_token_ids / prompt token ids entries
_TokenId = Annotated[int, Field(ge=0, lt=2**31)]


def _off(*ok: Any) -> Callable[[Any], bool]:
    """A refused field is harmless when it is None or one of `ok` (its "off" values): then it passes."""
    return lambda v: v is None or any(v == o and type(v) is type(o) for o in ok) or (v == [] and [] in ok)


# Fields OpenAI or vLLM define that this server does not implement: a value that would change the output is
# refused with a 400 naming the field (never silently ignored); their "off" values pass.
REFUSED_COMMON: dict[str, tuple[Callable[[Any], bool], str]] = {
    "best_of": (_off(1), "best_of > 1 is not supported (vLLM removed it too); use n"),
    "use_beam_search": (_off(False), "beam search is not supported"),
    "length_penalty": (_off(1.0, 1), "length_penalty applies to beam search, which is not supported"),
    "prompt_logprobs": (_off(), "prompt_logprobs are not supported"),
    "guided_json": (_off(), "guided decoding is not supported"),
    "guided_regex": (_off(), "guided decoding is not supported"),
    "guided_choice": (_off(), "guided decoding is not supported"),
    "guided_grammar": (_off(), "guided decoding is not supported"),
    "guided_decoding_backend": (_off(), "guided decoding is not supported"),
    "guided_whitespace_pattern": (_off(), "guided decoding is not supported"),
    "structured_outputs": (_off(), "structured outputs are not supported"),
    "logits_processors": (_off([]), "custom logits processors are not supported"),
    "bad_words": (_off([]), "bad_words are not supported; use logit_bias with -100 for single tokens"),
    "truncate_prompt_tokens": (_off(), "truncate_prompt_tokens is not supported"),
    "return_tokens_as_token_ids": (_off(False), "return_tokens_as_token_ids is not supported"),
    "return_token_ids": (_off(False), "return_token_ids is not supported"),
    "spaces_between_special_tokens": (_off(True), "spaces_between_special_tokens=false is not supported"),
    "vllm_xargs": (_off(), "vllm_xargs are not supported"),
    "kv_transfer_params": (_off(), "kv_transfer_params are not supported"),
    "prompt_embeds": (_off(), "prompt_embeds are not supported"),
    "cache_salt": (_off(), "cache_salt is not supported (prefix reuse is not partitioned)"),
    "priority": (_off(0), "request priorities are not supported"),
    "thinking_token_budget": (_off(), "thinking_token_budget is not supported"),
}
REFUSED_CHAT: dict[str, tuple[Callable[[Any], bool], str]] = {
    "functions": (_off([]), "function calling is not supported (AutoGLM writes its actions in <answer>)"),
    "function_call": (_off("none"), "function calling is not supported (AutoGLM writes its actions in <answer>)"),
    "audio": (_off(), "audio output is not supported"),
    "modalities": (_off(["text"]), "only the text modality is produced"),
    "prediction": (_off(), "predicted outputs are not supported"),
    "web_search_options": (_off(), "web search is not supported"),
    "reasoning_effort": (_off(), "reasoning_effort is not supported; use enable_thinking"),
    "verbosity": (_off(), "verbosity is not supported"),
    "store": (_off(False), "stored completions are not supported"),
    "echo": (_off(False), "echo is not supported"),
    "continue_final_message": (_off(False), "continue_final_message is not supported"),
    "add_generation_prompt": (_off(True), "add_generation_prompt=false is not supported"),
    "add_special_tokens": (_off(False), "add_special_tokens is not supported for chat"),
    "documents": (_off([]), "documents are not supported"),
    "chat_template": (_off(), "a request's own chat_template is not supported"),
    "mm_processor_kwargs": (_off(), "mm_processor_kwargs are not supported"),
}
REFUSED_COMPLETION: dict[str, tuple[Callable[[Any], bool], str]] = {
    "echo": (_off(False), "echo is not supported"),
    "suffix": (_off(""), "suffix (insertion) is not supported"),
}


class SamplingRequest(OpenAIRequestModel):
    """The sampling fields chat and text completions share (OpenAI's, then vLLM's), and their mapping to
    SamplingParams."""
    _refused: ClassVar[dict[str, tuple[Callable[[Any], bool], str]]] = REFUSED_COMMON

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    stop: _StopString | list[_StopString] | None = None
    seed: int | None = Field(default=None, ge=-_INT64, lt=_INT64)
    n: int | None = Field(default=1, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)

    # vLLM extensions
    top_k: int | None = Field(default=None, ge=-1, lt=_INT64)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=100)
    stop_token_ids: list[_TokenId] | None = Field(default=None, max_length=MAX_TOKEN_ID_LIST)
    ignore_eos: bool | None = None
    min_tokens: int | None = Field(default=None, ge=0)
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    allowed_token_ids: list[_TokenId] | None = Field(default=None, min_length=1, max_length=MAX_TOKEN_ID_LIST)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = _lone_surrogate(data)
        if where is not None:
            raise ValueError(f"{where or 'the request'} is not valid Unicode: it has a lone surrogate escape "
                             "(\\ud800-\\udfff not in a pair)")
        return data

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        extra = self.model_extra or {}
        for name, (harmless, why) in self._refused.items():
            if name in extra and not harmless(extra[name]):
                raise _field_error(name, extra[name], "unsupported_field", why)
        if self.min_tokens and self.max_tokens_asked is not None and self.min_tokens > self.max_tokens_asked:
            raise _field_error("min_tokens", self.min_tokens, "value_error",
                               f"{self.min_tokens} is more than max_tokens ({self.max_tokens_asked})")
        return self

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if v is not None and any(s == "" for s in ([v] if isinstance(v, str) else v)):
            raise ValueError("stop strings must not be empty")
        if isinstance(v, list) and len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings are supported, not {len(v)}")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias_ids(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for k, b in (v or {}).items():
            if not k.isdigit() or int(k) >= 2**31:
                raise ValueError(f"keys must be token ids (non-negative integers), not {k[:32]!r}")
            if not -100 <= b <= 100:
                raise ValueError(f"bias {b} for token {k} is outside [-100, 100]")
        return v

    @property
    def max_tokens_asked(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)

    def token_ids_named(self) -> dict[str, list[int]]:
        """The token-id fields, for the serving layer's vocabulary check."""
        return {"logit_bias": [int(k) for k in (self.logit_bias or {})],
                "allowed_token_ids": list(self.allowed_token_ids or ()),
                "stop_token_ids": list(self.stop_token_ids or ())}

    def _logprobs_k(self) -> int | None:
        return None

    def to_sampling_params(self, default_max_tokens: int | None = None,
                           defaults: dict[str, Any] | None = None) -> SamplingParams:
        """The engine's params: what the request sets, else `defaults` (the checkpoint's generation config, keys
        as GENERATION_CONFIG_KEYS map them), else `default_max_tokens` for max_tokens, else SamplingParams'."""
        defaults = defaults or {}
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        top_k = self.top_k if self.top_k is not None else defaults.get("top_k")
        given = {
            "max_tokens": self.max_tokens_asked or defaults.get("max_tokens") or default_max_tokens,
            "temperature": _first(self.temperature, defaults.get("temperature")),
            "top_p": _first(self.top_p, defaults.get("top_p")),
            "top_k": None if top_k is None else max(int(top_k), 0),   # vLLM: -1 and 0 both mean off
            "min_p": _first(self.min_p, defaults.get("min_p")),
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "repetition_penalty": _first(self.repetition_penalty, defaults.get("repetition_penalty")),
            "seed": self.seed,
            "stop": tuple(stop),
            "stop_token_ids": tuple(self.stop_token_ids or ()),
            "ignore_eos": self.ignore_eos,
            "skip_special_tokens": self.skip_special_tokens,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "min_tokens": self.min_tokens,
            "logit_bias": tuple((int(k), float(b)) for k, b in self.logit_bias.items()) if self.logit_bias else None,
            "allowed_token_ids": tuple(self.allowed_token_ids) if self.allowed_token_ids else None,
            "logprobs": self._logprobs_k(),
        }
        return SamplingParams(**{k: v for k, v in given.items() if v is not None})


def _field_error(field: str, value: Any, kind: str, message: str) -> ValidationError:
    """An error located at `field` (so the 400's `param` names it), raised from a model validator."""
    return ValidationError.from_exception_data("request", [InitErrorDetails(
        type=PydanticCustomError(kind, message.replace("{", "(").replace("}", ")")), loc=(field,), input=value)])


def _first(*vals: Any) -> Any:
    return next((v for v in vals if v is not None), None)


class ChatCompletionRequest(SamplingRequest):
    # https://platform.openai.com/docs/api-reference/chat/create
    _refused: ClassVar[dict[str, tuple[Callable[[Any], bool], str]]] = {**REFUSED_COMMON, **REFUSED_CHAT}

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tool_choice: str | dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None      # after tool_choice: its validator reads tool_choice
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    # AutoGLM deployment-guide extensions (also accepted inside chat_template_kwargs)
    enable_thinking: bool | None = None
    return_reasoning: bool | None = None

    # voice: include the transcripts of input_audio parts in the response (docs/voice.md)
    return_transcript: bool | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
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
    def max_tokens_asked(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def _logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def return_reasoning_enabled(self) -> bool:
        """Split `<think>` reasoning into `reasoning_content` (top-level flag wins over chat_template_kwargs)."""
        if self.return_reasoning is not None:
            return self.return_reasoning
        return bool((self.chat_template_kwargs or {}).get("return_reasoning", False))

    def template_kwargs(self) -> dict[str, Any]:
        """Chat-template variables for the engine: the client's, with the top-level `enable_thinking` applied."""
        kw = {k: v for k, v in (self.chat_template_kwargs or {}).items() if k != "return_reasoning"}
        if self.enable_thinking is not None:
            kw["enable_thinking"] = self.enable_thinking
        return kw


MAX_PROMPTS = 64    # prompts in one /v1/completions request
_Prompt = Annotated[str, Field(max_length=4 * 2**20)]
_PromptIds = Annotated[list[_TokenId], Field(min_length=1, max_length=MAX_TOKEN_ID_LIST)]


class CompletionRequest(SamplingRequest):
    # https://platform.openai.com/docs/api-reference/completions/create (legacy text completions)
    _refused: ClassVar[dict[str, tuple[Callable[[Any], bool], str]]] = {**REFUSED_COMMON, **REFUSED_COMPLETION}

    prompt: _Prompt | _PromptIds | Annotated[list[_Prompt], Field(min_length=1, max_length=MAX_PROMPTS)] | \
        Annotated[list[_PromptIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    max_tokens: int | None = Field(default=16, ge=1)   # OpenAI's default for completions
    add_special_tokens: bool = True                   # vLLM: tokenize a string prompt with the BOS etc.

    def _logprobs_k(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return list(p)


class TokenizeRequest(OpenAIRequestModel):
    """vLLM's POST /tokenize: a prompt, or chat messages rendered with the chat template (images expanded)."""
    model: str | None = None
    prompt: _Prompt | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=MAX_MESSAGES)
    add_special_tokens: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    enable_thinking: bool | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_of(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = omitted()


class DetokenizeRequest(OpenAIRequestModel):
    model: str | None = None
    tokens: list[_TokenId] = Field(max_length=MAX_TOKEN_ID_LIST)


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


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


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobInfo(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobInfo] | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
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
    logprobs: ChoiceLogprobs | None = None
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


class CompletionLogprobs(BaseModel):
    """Legacy completions' logprobs shape."""
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = omitted()


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "autoglm"
    root: str
    max_model_len: int | None = omitted()
    #: the sampling defaults in force for omitted fields (the checkpoint's generation_config.json; GENERATION_CONFIG)
    default_sampling_params: dict[str, Any] | None = omitted()


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
