"""Every Prometheus metric of the function, in one registry that `GET /metrics` renders.

One module-level registry (not prometheus-client's global default) so nothing a library registers leaks into our
endpoint and tests can read values back. Callers never touch metric objects: they call the functions below, which
keeps names and labels in one place. No framework imports: the HTTP layer and the engine both call in.

Names follow Prometheus conventions: HTTP metrics use the common `http_*` names so KEDA / HPA queries such as
`sum(rate(http_requests_total{route="/v1/chat/completions"}[1m]))` work unchanged; model-serving metrics carry the
`autoglm_` prefix.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
_TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5, 5)

# --- HTTP (written by the API layer)
HTTP_REQUESTS = Counter(
    "http_requests", "HTTP requests answered, by route template, method and status code.",
    ["route", "method", "status"], registry=REGISTRY)
"""`http_requests_total`: one count per finished request; `route` is the route template (unknown paths: "other")."""

HTTP_LATENCY = Histogram(
    "http_request_duration_seconds", "Time from request start to the last response byte, by route and method.",
    ["route", "method"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
"""Whole-request latency; for streams it ends with `[DONE]`, so it includes the full generation."""

HTTP_IN_FLIGHT = Gauge(
    "http_requests_in_flight", "Requests being answered now, by route.", ["route"], registry=REGISTRY)
"""Concurrency signal for autoscaling (the KPA scales on concurrency; KEDA can use this gauge)."""

# --- completions (written by the API layer)
PROMPT_TOKENS = Counter("autoglm_prompt_tokens", "Prompt tokens processed (images included).", registry=REGISTRY)
"""`autoglm_prompt_tokens_total`, from the engine's usage of each finished request."""

GENERATION_TOKENS = Counter("autoglm_generation_tokens", "Completion tokens generated.", registry=REGISTRY)
"""`autoglm_generation_tokens_total`, from the engine's usage of each finished request."""

TTFT = Histogram(
    "autoglm_time_to_first_token_seconds", "Time from request arrival to the first generated text.",
    buckets=_LATENCY_BUCKETS, registry=REGISTRY)
"""Includes image decoding, queueing and prefill: what a client waits before the first token."""

ITL = Histogram(
    "autoglm_inter_token_latency_seconds", "Time between successive generated tokens of a request.",
    buckets=_TOKEN_LATENCY_BUCKETS, registry=REGISTRY)
"""Decode speed as a client sees it; an increment carrying k tokens counts k observations of gap/k."""

# --- engine (written by the engine)
QUEUE_DEPTH = Gauge("autoglm_queue_depth", "Requests accepted and not yet running (being prepared or waiting for a "
                    "batch slot).", registry=REGISTRY)
"""Admission queue length, the number MAX_QUEUE_SIZE bounds: when it is full, new requests get 429."""

RUNNING = Gauge("autoglm_running_requests", "Requests in the running batch.", registry=REGISTRY)
"""Current continuous-batching size (at most MAX_NUM_SEQS)."""

BUSY = Gauge("autoglm_engine_busy_ratio", "Fraction of recent wall time the engine thread spent in model steps.",
             registry=REGISTRY)
"""0..1 over the engine's own sampling window; near 1 means the accelerator is the bottleneck."""

ENGINE_STEP = Histogram("autoglm_engine_step_seconds", "Time of the engine's prefill and decode forwards per step: "
                        "launch plus the wait for their tokens.", ["phase"], buckets=_TOKEN_LATENCY_BUCKETS,
                        registry=REGISTRY)
"""phase=prefill|decode. Beside the inter-token latency it tells the engine's share of a gap from the rest
(scheduling, the event loop, the network): decode step mean = rate(_sum) / rate(_count)."""

PREFIX_HIT_TOKENS = Counter("autoglm_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache.",
                            registry=REGISTRY)
"""`autoglm_prefix_cache_hit_tokens_total`; hit rate = rate(hit) / rate(queried)."""

PREFIX_QUERIED_TOKENS = Counter("autoglm_prefix_cache_queried_tokens",
                                "Prompt tokens looked up in the prefix cache.", registry=REGISTRY)
"""`autoglm_prefix_cache_queried_tokens_total`: the denominator of the prefix-cache hit rate."""

GPU_MEMORY_USED = Gauge("autoglm_gpu_memory_used_bytes", "GPU memory allocated by tensors.", registry=REGISTRY)
"""torch.cuda.memory_allocated on the serving device (0 on CPU)."""

GPU_MEMORY_RESERVED = Gauge("autoglm_gpu_memory_reserved_bytes", "GPU memory reserved by the caching allocator.",
                            registry=REGISTRY)
"""torch.cuda.memory_reserved on the serving device (0 on CPU)."""

COLD_START_PHASE = Gauge("autoglm_cold_start_phase_seconds", "Duration of each cold-start phase.", ["phase"],
                         registry=REGISTRY)
"""Seconds spent per startup phase (e.g. weights, quantize, warmup); the sum is the time to ready."""

MODEL_INFO = Gauge("autoglm_model_info", "The served model and how it runs (value is always 1).",
                   ["model", "quantization", "attn_implementation", "device", "dtype", "model_impl"],
                   registry=REGISTRY)
"""Resolved startup choices as labels, so dashboards can group or filter by them."""


# --- API-layer functions
def observe_http(route: str, method: str, status: int, seconds: float) -> None:
    HTTP_REQUESTS.labels(route, method, str(status)).inc()
    HTTP_LATENCY.labels(route, method).observe(seconds)


def in_flight(route: str) -> Gauge:
    """The in-flight gauge of `route`, for `with in_flight(route).track_inprogress():`."""
    return HTTP_IN_FLIGHT.labels(route)


def observe_usage(prompt_tokens: int, completion_tokens: int) -> None:
    PROMPT_TOKENS.inc(prompt_tokens)
    GENERATION_TOKENS.inc(completion_tokens)


def observe_ttft(seconds: float) -> None:
    TTFT.observe(seconds)


def observe_inter_token(seconds: float, tokens: int) -> None:
    """An increment of `tokens` tokens arrived `seconds` after the previous one."""
    if tokens > 0:
        per_token = seconds / tokens
        for _ in range(tokens):
            ITL.observe(per_token)


# --- engine functions
def set_queue_depth(n: int) -> None:
    QUEUE_DEPTH.set(n)


def set_running(n: int) -> None:
    RUNNING.set(n)


def observe_engine_step(phase: str, seconds: float) -> None:
    ENGINE_STEP.labels(phase=phase).observe(seconds)


def set_busy_ratio(ratio: float) -> None:
    BUSY.set(ratio)


def observe_prefix_cache(hit_tokens: int, queried_tokens: int) -> None:
    PREFIX_HIT_TOKENS.inc(hit_tokens)
    PREFIX_QUERIED_TOKENS.inc(queried_tokens)


def set_gpu_memory(used_bytes: int, reserved_bytes: int) -> None:
    GPU_MEMORY_USED.set(used_bytes)
    GPU_MEMORY_RESERVED.set(reserved_bytes)


def set_cold_start_phase(phase: str, seconds: float) -> None:
    COLD_START_PHASE.labels(phase).set(seconds)


def set_model_info(*, model: str, quantization: str, attn_implementation: str, device: str, dtype: str,
                   model_impl: str = "transformers") -> None:
    """Record the resolved startup choices (replaces any earlier record)."""
    MODEL_INFO.clear()
    MODEL_INFO.labels(model, quantization, attn_implementation, device, dtype, model_impl).set(1)


# --- CloudEvents (written by function/events.py)
EVENTS_RECEIVED = Counter(
    "autoglm_events_received", "Requests on the CloudEvents routes, by event type.", ["type"], registry=REGISTRY)
"""`autoglm_events_received_total`: `type` is CE_REQUEST_TYPE, "other" (a CloudEvent of another type) or "invalid"
(not a decodable CloudEvent), so label values stay bounded whatever producers send."""

EVENTS_REPLIED = Counter(
    "autoglm_events_replied", "Reply events sent (200), by whether the reply was replayed for a redelivered id.",
    ["replayed"], registry=REGISTRY)
"""`autoglm_events_replied_total{replayed="true"}`: redeliveries answered from the recent-ids map (or by joining the
computation already running for that id) without calling the engine again."""

EVENTS_FAILED = Counter(
    "autoglm_events_failed", "Events answered with an error event, by reason (the error code).", ["reason"],
    registry=REGISTRY)
"""`autoglm_events_failed_total`: reasons such as not_a_cloudevent, invalid_event, unsupported_event_type,
invalid_request, overloaded, not_ready, unavailable, internal (docs/events.md lists them with their status)."""


def observe_event_received(event_type: str) -> None:
    EVENTS_RECEIVED.labels(event_type).inc()


def observe_event_replied(replayed: bool) -> None:
    EVENTS_REPLIED.labels("true" if replayed else "false").inc()


def observe_event_failed(reason: str) -> None:
    EVENTS_FAILED.labels(reason).inc()


# --- response cache (written by function.cache and the cache layer in function.front)
_HIT_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 1)

CACHE_REQUESTS = Counter(
    "autoglm_response_cache_requests", "Chat requests by what the response cache did: hit, miss or bypass.",
    ["result"], registry=REGISTRY)
"""`autoglm_response_cache_requests_total{result}`: hit (answered from the cache, single-flight followers
included), miss (looked up, not found, sent to the model), bypass (not looked up: sampled request, Cache-Control:
no-cache, unparseable body, ...). Hit ratio = hit / (hit + miss)."""

CACHE_COALESCED = Counter(
    "autoglm_response_cache_coalesced", "Requests that waited for an identical in-flight miss (single flight).",
    registry=REGISTRY)
"""`autoglm_response_cache_coalesced_total`: generations saved by single flight (also counted as hits)."""

CACHE_STORE_ERRORS = Counter(
    "autoglm_response_cache_store_errors", "Failed or timed-out cache store calls, by store and operation.",
    ["store", "op"], registry=REGISTRY)
"""`autoglm_response_cache_store_errors_total{store="redis",op="get|set"}`: each one was answered fail-open."""

CACHE_STORE_UP = Gauge(
    "autoglm_response_cache_store_up", "1 while the store answers, 0 after a failure until it answers again.",
    ["store"], registry=REGISTRY)
"""Alert on `autoglm_response_cache_store_up{store="redis"} == 0`: requests still succeed, without the cache."""

CACHE_WRITTEN_BYTES = Counter(
    "autoglm_response_cache_written_bytes", "Bytes of entries written, by store.", ["store"], registry=REGISTRY)
"""`autoglm_response_cache_written_bytes_total{store}`: stored answer sizes (Redis memory planning)."""

CACHE_BYTES = Gauge("autoglm_response_cache_bytes", "Bytes held by the in-process response cache.",
                    registry=REGISTRY)
"""Bounded by RESPONSE_CACHE_MAX_BYTES."""

CACHE_ENTRIES = Gauge("autoglm_response_cache_entries", "Entries held by the in-process response cache.",
                      registry=REGISTRY)
"""Bounded by RESPONSE_CACHE_MAX_ENTRIES."""

CACHE_HIT_LATENCY = Histogram(
    "autoglm_response_cache_hit_seconds", "Time to answer a cache hit, from request start to its last byte.",
    ["store"], buckets=_HIT_BUCKETS, registry=REGISTRY)
"""Server-side hit latency by the store that had the entry (memory, redis, flight: a single-flight follower)."""


def observe_cache_result(result: str) -> None:
    CACHE_REQUESTS.labels(result).inc()


def observe_cache_coalesced() -> None:
    CACHE_COALESCED.inc()


def observe_cache_hit(store: str, seconds: float) -> None:
    CACHE_HIT_LATENCY.labels(store).observe(seconds)


def observe_cache_store_error(store: str, op: str) -> None:
    CACHE_STORE_ERRORS.labels(store, op).inc()
    CACHE_STORE_UP.labels(store).set(0)


def set_cache_store_up(store: str) -> None:
    CACHE_STORE_UP.labels(store).set(1)


def observe_cache_write(store: str, nbytes: int) -> None:
    CACHE_WRITTEN_BYTES.labels(store).inc(nbytes)


def set_cache_size(entries: int, nbytes: int) -> None:
    CACHE_ENTRIES.set(entries)
    CACHE_BYTES.set(nbytes)


# --- voice (written by function/asr.py)
AUDIO_SECONDS = Counter("autoglm_audio_seconds", "Seconds of input_audio transcribed.", registry=REGISTRY)
"""`autoglm_audio_seconds_total`: audio duration after decoding, one increment per transcribed part."""

ASR_LATENCY = Histogram(
    "autoglm_asr_latency_seconds", "Time from queueing an audio part for transcription to its transcript.",
    buckets=_LATENCY_BUCKETS, registry=REGISTRY)
"""Per part: waiting for the batch in progress plus the batch's own transcription (decoding the file is not in)."""

ASR_BATCH_SIZE = Histogram(
    "autoglm_asr_batch_size", "Audio parts transcribed in one forward pass.", buckets=(1, 2, 4, 8, 16, 32),
    registry=REGISTRY)
"""How well concurrent voice requests share the speech model."""


def observe_asr(seconds: float, audio_seconds: float) -> None:
    """One part transcribed: its latency and its duration."""
    ASR_LATENCY.observe(seconds)
    AUDIO_SECONDS.inc(audio_seconds)


def observe_asr_batch(size: int) -> None:
    ASR_BATCH_SIZE.observe(size)


def render() -> tuple[bytes, str]:
    """The exposition text and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
