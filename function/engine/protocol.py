"""What the serving layer may know about the engine: request/param/output types, errors, and the client ABC.

No torch, no HTTP. The HTTP layer builds a `ChatInput` + `SamplingParams`, calls `EngineClient.generate`, and
gets an async stream of `CompletionChunk`s; errors are `function.errors.ServiceError`s (`EngineError` here) whose
`kind` maps to one HTTP status.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

# the client-visible errors live in function/errors.py (image, audio and API refusals raise them too); the engine's
# names are re-exported here, EngineError being their base
from function.errors import EngineDead, GenerationFailed, InternalError, InvalidInput, NotReady, Overloaded
from function.errors import ServiceError as EngineError

__all__ = ["FAILED_GRACE_S", "SamplingParams", "GENERATION_CONFIG_KEYS", "generation_defaults", "ChatInput",
           "TokenLogprob", "CompletionChunk", "EngineClient", "EngineError", "InvalidInput", "Overloaded", "NotReady",
           "GenerationFailed", "EngineDead", "InternalError"]

FAILED_GRACE_S = 30.0   # after a fatal load error, liveness stays up this long so readiness can say why


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling; every row of a batch carries its own."""
    max_tokens: int | None = None          # None: up to the context limit
    temperature: float = 1.0               # 0: greedy
    top_p: float = 1.0
    top_k: int = 0                         # 0: off
    frequency_penalty: float = 0.0         # OpenAI semantics: subtract penalty * count(token) from the logit
    presence_penalty: float = 0.0          # subtract penalty once for every token already generated
    repetition_penalty: float = 1.0        # HF/vLLM multiplicative penalty (1: off)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True       # as vLLM; GLM-4.1V's <think>/<answer> tags are not special tokens
    include_stop_str_in_output: bool = False   # keep the text of the stop string / end token that ended it
    min_p: float = 0.0                     # drop tokens below min_p x the top token's probability (0: off)
    min_tokens: int = 0                    # end tokens and stop strings are ignored before this many tokens
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, bias added to its logit)
    allowed_token_ids: tuple[int, ...] | None = None   # sample only among these ids (None: all)
    logprobs: int | None = None            # None: none; k: the sampled token's logprob and the top k (raw logits)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5 or self.top_k == 1


#: generation_config.json keys that become default sampling fields (vLLM's list; max_new_tokens -> max_tokens)
GENERATION_CONFIG_KEYS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p", "max_new_tokens")


def generation_defaults(gen_config: Any) -> dict[str, Any]:
    """The sampling defaults a checkpoint's GenerationConfig sets, as vLLM's `--generation-config auto` reads them:
    the values that differ from transformers' defaults, among GENERATION_CONFIG_KEYS."""
    if gen_config is None:
        return {}
    diff = gen_config.to_diff_dict() if hasattr(gen_config, "to_diff_dict") else dict(gen_config)
    out = {("max_tokens" if k == "max_new_tokens" else k): diff[k] for k in GENERATION_CONFIG_KEYS
           if diff.get(k) is not None}
    return out


@dataclass
class ChatInput:
    """A conversation in transformers' chat format: content parts {"type": "text", "text"} and
    {"type": "image", "image": PIL.Image.Image}. `image_digests` (one per image, in order) identify image
    content for prefix reuse and response caching."""
    messages: list[dict[str, Any]]
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    image_digests: list[str] = field(default_factory=list)
    prompt_token_ids: list[int] | None = None   # a raw prompt (/v1/completions): no chat template, no images


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability (log-softmax of the model's raw logits, as vLLM's default
    raw_logprobs) and the `top` most likely tokens at that step as (token id, logprob), best first."""
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class CompletionChunk:
    """One increment of a request's output. The last chunk has `finish_reason` set."""
    text: str
    token_ids: list[int]
    finish_reason: str | None = None       # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    stop_reason: str | int | None = None   # the stop string or token id that ended it (as vLLM reports)
    logprobs: list[TokenLogprob] | None = None   # one per token of `token_ids` when params.logprobs is set


class EngineClient(abc.ABC):
    """The async face of the engine that the serving layer uses."""

    max_model_len: int
    #: sampling defaults for fields a request omits: the checkpoint's generation_config.json (as vLLM's
    #: --generation-config auto), filled once the model is loaded; {} with GENERATION_CONFIG=vllm
    default_sampling: dict[str, Any] = {}
    vocab_size: int = 0    # token ids the model can produce (0: unknown)

    @abc.abstractmethod
    def generate(self, request_id: str, chat: ChatInput, params: SamplingParams) -> AsyncIterator[CompletionChunk]:
        """Stream the completion of `chat`. Raises EngineError before the first chunk if the request is refused;
        closing the iterator early aborts the request and frees its batch slot."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop a running request at the next step boundary."""

    async def tokenize(self, chat: ChatInput | None = None, prompt: str | None = None,
                       add_special_tokens: bool = True) -> list[int]:
        """Token ids of a chat (its rendered prompt, images expanded) or of a plain prompt string."""
        raise InvalidInput("this engine cannot tokenize")

    async def detokenize(self, token_ids: list[int]) -> str:
        raise InvalidInput("this engine cannot detokenize")

    def token_texts(self, token_ids: list[int]) -> list[str]:
        """The text of each token alone (logprobs' `token`)."""
        return [str(t) for t in token_ids]

    def start_loading(self) -> None:
        """Begin loading in the background and return at once (an engine that needs no loading: nothing)."""

    def shutdown(self) -> None:
        """Stop, blocking until stopped; requests still running end with an error."""

    @abc.abstractmethod
    def status(self) -> tuple[bool, bool, str]:
        """(alive, ready, message): message names the loading phase or the fatal error."""
