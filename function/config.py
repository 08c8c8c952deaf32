"""All settings of the function, read once from the environment mapping that func-python hands to `start(cfg)`.

This module is the only reader of environment keys: every other module receives a `Config`. Each field documents
its env var; `ENV_VARS` lists them all (the README's table and the manifest tests are checked against it).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping


class ConfigError(ValueError):
    """A setting has a value the function cannot run with; the message names the variable and the fix."""


def _default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "autoglm")


def _bool(name: str, raw: str) -> bool:
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name}={raw!r}: expected true or false")


def _ints(name: str, raw: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in raw.replace(" ", "").split(",") if x)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a comma-separated list of integers") from None
    if any(v <= 0 for v in vals):
        raise ConfigError(f"{name}={raw!r}: every value must be positive")
    return vals


def env(name: str, help: str, **kw):
    """A dataclass field bound to environment variable `name`."""
    md = {"env": name, "help": help}
    if "default_factory" in kw:
        return field(default_factory=kw["default_factory"], metadata=md)
    return field(default=kw["default"], metadata=md)


# The deployment guide's names for two settings: accepted, mapped to ours, logged once per start; a value that
# contradicts the setting it stands for is a start-up error (readiness shows it).
ENV_ALIASES: dict[str, str] = {"MODEL_MAX_LENGTH": "MAX_MODEL_LEN", "USE_FLASH_ATTENTION": "ATTN_IMPLEMENTATION"}


def _resolve_aliases(cfg: Mapping[str, str]) -> Mapping[str, str]:
    """MODEL_MAX_LENGTH=N -> MAX_MODEL_LEN=N; USE_FLASH_ATTENTION=true -> ATTN_IMPLEMENTATION=flash_attention_2,
    false -> sdpa. With both names set, the automatic value (ATTN_IMPLEMENTATION=auto, MAX_MODEL_LEN=0) and an equal
    one agree (false also agrees with eager); anything else is a ConfigError naming both."""
    if not any(a in cfg for a in ENV_ALIASES):
        return cfg
    out = dict(cfg)
    for alias, target in ENV_ALIASES.items():
        if alias not in cfg:
            continue
        raw = cfg[alias]
        if alias == "USE_FLASH_ATTENTION":
            flash = _bool(alias, raw)
            value = "flash_attention_2" if flash else "sdpa"
            agree, auto = ({value} if flash else {"sdpa", "eager"}), "auto"
            mine = cfg.get(target, auto).strip()
        else:
            if not raw.strip().isdigit():
                raise ConfigError(f"{alias}={raw!r}: expected a whole number of tokens")
            value, agree, auto = str(int(raw)), {str(int(raw))}, "0"
            mine = cfg.get(target, auto).strip()
            mine = str(int(mine)) if mine.isdigit() else mine
        if mine != auto and mine not in agree:
            raise ConfigError(f"{alias}={raw!r} (the deployment guide's name for {target}) contradicts "
                              f"{target}={cfg[target]!r}: set only one of them")
        out[target] = value if mine == auto else mine
        logging.getLogger(__name__).warning("%s=%s is the deployment guide's name: using %s=%s", alias, raw, target,
                                         out[target])
    return out


@dataclass(frozen=True)
class Config:
    # --- model
    model_path: str = env("MODEL_PATH", "Local checkpoint directory (the real AutoGLM-Phone-9B or any GLM-4.1V "
                          "checkpoint). Empty: the embedded tiny random-weight model, built once into MODEL_CACHE_DIR.",
                          default="")
    served_model_name: str = env("SERVED_MODEL_NAME", "Model name clients send and /v1/models lists.",
                                 default="autoglm-phone-9b")
    model_cache_dir: str = env("MODEL_CACHE_DIR", "Model cache volume: pre-quantized checkpoints, the tiny model, "
                               "compile caches.", default_factory=_default_cache_dir)
    quantization: str = env("QUANTIZATION", "auto | fp8 | nf4 | int8 | none. auto: none (bf16) where its weights "
                            "leave the KV room MAX_NUM_SEQS sequences want, else fp8 on cards with FP8 tensor cores "
                            "(compute capability >= 8.9), else nf4; none on CPU (docs/quantization.md).",
                            default="auto")
    quantize_vision: bool = env("QUANTIZE_VISION", "Quantize the vision tower too (default keeps it in bf16).",
                                default=False)
    prequantized_cache: bool = env("PREQUANTIZED_CACHE", "Write a pre-quantized checkpoint to MODEL_CACHE_DIR on the "
                                   "first quantizing start and load it on later starts.", default=True)
    attn_implementation: str = env("ATTN_IMPLEMENTATION", "auto | flash_attention_2 | sdpa | eager. auto: "
                                   "flash_attention_2 when flash-attn imports and CUDA is present, else sdpa.",
                                   default="auto")
    model_impl: str = env("MODEL_IMPL", "auto | native | transformers. Which implementation of the model and its "
                          "processor serves (vLLM's --model-impl). auto: the native torch implementation of GLM-4.1V "
                          "(function/engine/glm4v.py; no transformers import, so a cold start skips 4-10 s) for "
                          "bf16, fp8 and nf4 on one device; transformers for int8 (bitsandbytes' LLM.int8 quantizes "
                          "through it), GPUS_PER_POD > 1 and other architectures.", default="auto")
    device: str = env("DEVICE", "auto | cuda | cuda:N | cpu.", default="auto")
    dtype: str = env("DTYPE", "auto | bfloat16 | float16 | float32. auto: bfloat16 on CUDA, float32 on CPU.",
                     default="auto")
    require_gpu: bool = env("REQUIRE_GPU", "Refuse to serve on CPU (readiness says why).", default=False)
    gpus_per_pod: int = env("GPUS_PER_POD", "GPUs the model is split over (transformers device map); 1: one card.",
                            default=1)

    # --- engine
    max_model_len: int = env("MAX_MODEL_LEN", "Longest prompt + completion in tokens (0: min(model limit, 16384)).",
                             default=0)
    max_num_seqs: int = env("MAX_NUM_SEQS", "Sequences decoded together (continuous-batching slots).", default=32)
    max_prefill_tokens: int = env("MAX_PREFILL_TOKENS", "Prompt tokens prefilled together in one step while "
                                  "nothing decodes.", default=16384)
    prefill_chunk_tokens: int = env("PREFILL_CHUNK_TOKENS", "Prompt tokens prefilled per step while sequences "
                                    "decode (chunked prefill: bounds the inter-token gap of running streams).",
                                    default=2048)
    prefill_encoder_tokens: int = env("PREFILL_ENCODER_TOKENS", "Image tokens' worth of vision-tower work one step "
                                      "may run while sequences decode, beside the text chunk; a larger image is "
                                      "encoded over several steps (PREFILL_SPLIT_ENCODES) or, where the tower "
                                      "runs whole, in a step of its own; 0: encodes count against "
                                      "PREFILL_CHUNK_TOKENS.", default=2048)
    prefill_split_encodes: bool = env("PREFILL_SPLIT_ENCODES", "Spread a screenshot's vision encode over steps, in "
                                      "pieces of the tower's blocks, while sequences decode (the native GLM-4.1V "
                                      "implementation). Off by default: on an H200 it cut the 32-agent "
                                      "inter-token gap p99 by 29% but cost 10% of turns per minute and tripled "
                                      "the gap p50 (bench/RESULTS.md).", default=False)
    gpu_memory_utilization: float = env("GPU_MEMORY_UTILIZATION", "Fraction of GPU memory the engine may use "
                                        "(weights + KV cache + activations).", default=0.90)
    cuda_graphs: bool = env("CUDA_GRAPHS", "Capture decode steps as CUDA graphs (CUDA only).", default=True)
    rotary_kernels: bool = env("ROTARY_KERNELS", "Rotary embeddings in one Triton kernel per tensor (native model, "
                               "CUDA; used only after matching the torch ops bit for bit at start).", default=True)
    cuda_graph_batch_sizes: tuple[int, ...] = env("CUDA_GRAPH_BATCH_SIZES", "Decode batch buckets captured as graphs "
                                                  "(empty: 1,2,4,8,16,24,32,48,64 up to MAX_NUM_SEQS).",
                                                  default=())
    prefix_caching: bool = env("PREFIX_CACHING", "Reuse the KV of a shared prompt prefix.", default=True)
    warmup: bool = env("WARMUP", "Run text and image requests through every batch bucket before ready.",
                       default=True)
    max_queue_size: int = env("MAX_QUEUE_SIZE", "Requests waiting for a batch slot before 429 (0: 4 x MAX_NUM_SEQS).",
                              default=0)
    request_timeout_s: float = env("REQUEST_TIMEOUT_S", "Per-request deadline in seconds.", default=600.0)
    generation_config: str = env("GENERATION_CONFIG", "auto | vllm. auto: the checkpoint's generation_config.json "
                                 "gives the defaults of sampling fields a request omits (as vLLM's --generation-config "
                                 "auto); vllm: vLLM's own defaults (temperature 1, no top-k/top-p).", default="auto")
    default_max_tokens: int = env("DEFAULT_MAX_TOKENS", "max_tokens when the request gives none (0: up to the "
                                  "context).", default=0)

    # --- images
    image_max_pixels: int = env("IMAGE_MAX_PIXELS", "Resize bound given to the processor (pixels after resize; "
                                "0: the checkpoint's own setting).", default=0)
    max_image_bytes: int = env("MAX_IMAGE_BYTES", "Largest encoded image accepted.", default=20 * 1024 * 1024)
    max_image_source_pixels: int = env("MAX_IMAGE_SOURCE_PIXELS", "Largest decoded image (width x height) accepted; "
                                       "guards against decompression bombs.", default=40_000_000)
    max_images_per_request: int = env("MAX_IMAGES_PER_REQUEST", "Images in one request.", default=8)
    allowed_local_media_path: str = env("ALLOWED_LOCAL_MEDIA_PATH", "Directory that file:// image URLs may read "
                                        "(empty: file:// refused).", default="")
    allow_remote_images: bool = env("ALLOW_REMOTE_IMAGES", "Fetch http(s) image URLs.", default=False)
    remote_image_timeout_s: float = env("REMOTE_IMAGE_TIMEOUT_S", "Timeout for fetching an image URL.", default=10.0)

    # --- voice (speech to text before the model)
    asr_model_path: str = env("ASR_MODEL_PATH", "Local Whisper-family checkpoint for input_audio parts (empty: audio "
                              "is refused with a 400).", default="")
    asr_language: str = env("ASR_LANGUAGE", "Transcription language (empty: detect).", default="")
    max_audio_bytes: int = env("MAX_AUDIO_BYTES", "Largest encoded audio part accepted.", default=10 * 1024 * 1024)
    max_audio_seconds: float = env("MAX_AUDIO_SECONDS", "Longest audio part accepted.", default=60.0)
    return_transcript: bool = env("RETURN_TRANSCRIPT", "Always include transcripts in responses (else only when the "
                                  "request asks with return_transcript).", default=False)

    # --- request limits
    max_request_bytes: int = env("MAX_REQUEST_BYTES", "Largest request body accepted (413 above).",
                                 default=64 * 1024 * 1024)

    # --- security (docs/security.md)
    api_key: str = env("API_KEY", "API key(s) clients must send as Authorization: Bearer <key> on /v1/* and the "
                       "tokenizer routes; several comma-separated (empty, with no API_KEY_FILE: no authentication).",
                       default="")
    api_key_file: str = env("API_KEY_FILE", "File with API keys, one per line or comma-separated (a mounted Secret); "
                            "re-read when it changes, so keys rotate without a restart.", default="")
    api_key_protects_health: bool = env("API_KEY_PROTECTS_HEALTH", "With keys configured, /health and /metrics need "
                                        "the key too (the Kubernetes probes stay open).", default=False)
    events_trust_network: bool = env("EVENTS_TRUST_NETWORK", "With keys configured, accept CloudEvents on / and "
                                     "/events without a key (only where the Service is cluster-local and a "
                                     "NetworkPolicy admits only the broker).", default=False)
    events_oidc_audience: str = env("EVENTS_OIDC_AUDIENCE", "Knative Eventing sender identity (feature "
                                    "authentication-oidc): CloudEvents on / and /events must carry Authorization: "
                                    "Bearer <JWT> issued for this audience (the Trigger's subscriber.audience), or, "
                                    "with API keys configured, a valid key (empty: no OIDC check).", default="")
    events_oidc_issuer: str = env("EVENTS_OIDC_ISSUER", "The tokens' `iss` (empty: the issuer that the API server's "
                                  "discovery document https://kubernetes.default.svc/.well-known/openid-configuration "
                                  "names, as Knative's own receivers do).", default="")
    events_oidc_jwks_url: str = env("EVENTS_OIDC_JWKS_URL", "Where the issuer's signing keys are fetched, with the "
                                    "pod's service-account token and CA.",
                                    default="https://kubernetes.default.svc/openid/v1/jwks")
    events_oidc_jwks_file: str = env("EVENTS_OIDC_JWKS_FILE", "A JWKS file used instead of EVENTS_OIDC_JWKS_URL (a "
                                     "mounted ConfigMap; tests); re-read when it changes.", default="")
    events_oidc_allowed_subjects: str = env("EVENTS_OIDC_ALLOWED_SUBJECTS", "Comma-separated `sub` values accepted, "
                                            "e.g. system:serviceaccount:<ns>:<trigger>-oidc-eventing.knative.dev-"
                                            "trigger (empty: any subject the issuer signed for the audience).",
                                            default="")
    events_oidc_jwks_ttl_s: float = env("EVENTS_OIDC_JWKS_TTL_S", "Seconds the fetched signing keys are kept before "
                                        "they are fetched again (a token with an unknown key id fetches them "
                                        "sooner, at most every 30 s).", default=300.0)
    response_cache_share_keys: bool = env("RESPONSE_CACHE_SHARE_KEYS", "Let cached answers cross API keys (default: "
                                          "each key has its own entries).", default=False)
    max_json_depth: int = env("MAX_JSON_DEPTH", "Deepest nesting of arrays and objects in a request body (400 "
                              "above), checked before the body is parsed.", default=32)
    max_json_elements: int = env("MAX_JSON_ELEMENTS", "Most JSON values (array items, object members) in a request "
                                 "body (400 above), checked before the body is parsed.", default=200_000)
    max_request_image_pixels: int = env("MAX_REQUEST_IMAGE_PIXELS", "Most image pixels (width x height, summed over "
                                        "a request's images) decoded for one request; checked from the headers "
                                        "before any image is decoded.", default=64 * 2**20)
    remote_image_allowed_hosts: str = env("REMOTE_IMAGE_ALLOWED_HOSTS", "Comma-separated host names whose image URLs "
                                          "may resolve to loopback, private or link-local addresses (all others "
                                          "are refused).", default="")
    remote_image_max_redirects: int = env("REMOTE_IMAGE_MAX_REDIRECTS", "Redirects followed when fetching an image "
                                          "URL, each re-checked.", default=3)

    # --- response cache
    response_cache: str = env("RESPONSE_CACHE", "memory | off. The in-process response cache.", default="memory")
    response_cache_url: str = env("RESPONSE_CACHE_URL", "redis://... : a shared Redis/Valkey response cache.",
                                  default="")
    response_cache_ttl_s: float = env("RESPONSE_CACHE_TTL_S", "Time a cached response lives.", default=3600.0)
    response_cache_max_entries: int = env("RESPONSE_CACHE_MAX_ENTRIES", "In-process cache entries.", default=1024)
    response_cache_max_bytes: int = env("RESPONSE_CACHE_MAX_BYTES", "In-process cache bytes.", default=64 * 2**20)
    response_cache_all: bool = env("RESPONSE_CACHE_ALL", "Also cache sampled (temperature>0, unseeded) requests.",
                                   default=False)
    role: str = env("ROLE", "model | cache-front. cache-front serves cache hits and proxies misses to MODEL_URL.",
                    default="model")
    model_url: str = env("MODEL_URL", "Base URL of the model service (cache-front role).", default="")

    # --- CloudEvents
    ce_request_type: str = env("CE_REQUEST_TYPE", "CloudEvent type of chat requests.",
                               default="com.autoglm.chat.completion.request")
    ce_response_type: str = env("CE_RESPONSE_TYPE", "CloudEvent type of replies.",
                                default="com.autoglm.chat.completion.response")
    ce_source: str = env("CE_SOURCE", "CloudEvent source of replies (empty: derived from K_SERVICE/K_REVISION).",
                         default="")

    # --- serving
    log_level: str = env("LOG_LEVEL", "Python log level.", default="INFO")
    k_service: str = env("K_SERVICE", "Set by Knative: the service name.", default="")
    k_revision: str = env("K_REVISION", "Set by Knative: the revision name.", default="")

    @classmethod
    def from_env(cls, cfg: Mapping[str, str] | None = None) -> "Config":
        """Build from an environment mapping (func-python's `cfg`); unknown keys are ignored."""
        cfg = _resolve_aliases(os.environ if cfg is None else cfg)
        kwargs = {}
        for f in fields(cls):
            name = f.metadata["env"]
            if name not in cfg:
                continue
            raw = cfg[name]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            try:
                if isinstance(default, bool):
                    kwargs[f.name] = _bool(name, raw)
                elif isinstance(default, int):
                    kwargs[f.name] = int(raw)
                elif isinstance(default, float):
                    kwargs[f.name] = float(raw)
                elif isinstance(default, tuple):
                    kwargs[f.name] = _ints(name, raw)
                else:
                    kwargs[f.name] = raw.strip()
            except ValueError as e:
                if isinstance(e, ConfigError):
                    raise
                raise ConfigError(f"{name}={raw!r}: expected a {type(default).__name__}") from None
        c = cls(**kwargs)
        c.validate()
        return c

    def validate(self) -> None:
        def bad(name, msg):
            raise ConfigError(f"{name}: {msg}")

        for name, r in RANGES.items():
            value = getattr(self, name)
            if not r.holds(value):
                raise ConfigError(f"{_ENV_OF[name]}={value!r}: {r.message}")
        if self.quantization not in ("auto", "fp8", "nf4", "int8", "none", "bf16"):
            bad("QUANTIZATION", f"{self.quantization!r} is not one of auto, fp8, nf4, int8, none")
        if self.model_impl not in ("auto", "native", "transformers"):
            bad("MODEL_IMPL", f"{self.model_impl!r} is not one of auto, native, transformers")
        if self.attn_implementation not in ("auto", "flash_attention_2", "sdpa", "eager"):
            bad("ATTN_IMPLEMENTATION", f"{self.attn_implementation!r} is not one of auto, flash_attention_2, sdpa, "
                "eager")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            bad("DTYPE", f"{self.dtype!r} is not one of auto, bfloat16, float16, float32")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            bad("DEVICE", f"{self.device!r} is not one of auto, cpu, cuda, cuda:N")
        if self.generation_config not in ("auto", "vllm"):
            bad("GENERATION_CONFIG", f"{self.generation_config!r} is not one of auto, vllm")
        if self.response_cache not in ("memory", "off"):
            bad("RESPONSE_CACHE", "must be memory or off")
        if self.response_cache_url and not self.response_cache_url.startswith(("redis://", "rediss://", "unix://")):
            bad("RESPONSE_CACHE_URL", "must be a redis://, rediss:// or unix:// URL")
        if self.role not in ("model", "cache-front"):
            bad("ROLE", "must be model or cache-front")
        if self.role == "cache-front" and not self.model_url:
            bad("MODEL_URL", "the cache-front role needs the model service's URL")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            bad("LOG_LEVEL", f"{self.log_level!r} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        if self.events_oidc_audience and self.events_trust_network:
            bad("EVENTS_TRUST_NETWORK", "cannot be combined with EVENTS_OIDC_AUDIENCE: with OIDC configured every "
                "CloudEvent must carry a token (or an API key); unset one of them")
        if self.events_oidc_audience:
            if not (self.events_oidc_jwks_file or self.events_oidc_jwks_url.startswith(("https://", "http://"))):
                bad("EVENTS_OIDC_JWKS_URL", "must be an http(s) URL (or set EVENTS_OIDC_JWKS_FILE)")
            if self.events_oidc_jwks_file and not self.events_oidc_issuer:
                bad("EVENTS_OIDC_ISSUER", "must be set with EVENTS_OIDC_JWKS_FILE (the issuer is discovered only "
                    "from the API server)")

    # --- derived values
    @property
    def queue_limit(self) -> int:
        return self.max_queue_size or 4 * self.max_num_seqs

    @property
    def tiny_model_dir(self) -> Path:
        return Path(self.model_cache_dir) / "tiny-glm4v"

    @property
    def ce_reply_source(self) -> str:
        if self.ce_source:
            return self.ce_source
        svc = self.k_service or "autoglm-phone-9b"
        return f"/knative/{svc}/{self.k_revision}" if self.k_revision else f"/knative/{svc}"


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take: at least `low` (above it when `above`), at most `high`."""
    low: float
    high: float | None = None
    above: bool = False
    why: str = ""

    def holds(self, value: float) -> bool:       # NaN holds nowhere
        return (value > self.low if self.above else value >= self.low) and (self.high is None or value <= self.high)

    @property
    def message(self) -> str:
        low = f"{self.low:g}"
        if self.high is not None:
            text = f"must be between {low} and {self.high:g}"
        elif self.above:
            text = "must be positive" if self.low == 0 else f"must be above {low}"
        else:
            text = f"must be at least {low}"
        return text + (f" ({self.why})" if self.why else "")


POSITIVE = Range(0, above=True)
#: every int and float setting, by field name (tests/test_config.py checks that none is missing); 0 where 0 means
#: "automatic" or "off"
RANGES: dict[str, Range] = {
    "gpus_per_pod": Range(1),
    "max_model_len": Range(0, why="0: the model's limit, at most 16384"),
    "max_num_seqs": Range(1),
    "max_prefill_tokens": Range(256),
    "prefill_chunk_tokens": Range(256),
    "prefill_encoder_tokens": Range(0, why="0: encodes are charged to PREFILL_CHUNK_TOKENS"),
    "gpu_memory_utilization": Range(0.05, 0.99),
    "max_queue_size": Range(0, why="0: 4 x MAX_NUM_SEQS"),
    "request_timeout_s": POSITIVE,
    "default_max_tokens": Range(0, why="0: up to the context"),
    "image_max_pixels": Range(0, why="0: the checkpoint's own setting"),
    "max_image_bytes": Range(1),
    "max_image_source_pixels": Range(1),
    "max_images_per_request": Range(0),
    "remote_image_timeout_s": POSITIVE,
    "max_audio_bytes": Range(1),
    "max_audio_seconds": POSITIVE,
    "max_request_bytes": Range(1024),
    "events_oidc_jwks_ttl_s": Range(10, 86400, why="seconds"),
    "max_json_depth": Range(4, why="a chat request nests 4 deep"),
    "max_json_elements": Range(16),
    "max_request_image_pixels": Range(1),
    "remote_image_max_redirects": Range(0, 10),
    "response_cache_ttl_s": POSITIVE,
    "response_cache_max_entries": Range(1),
    "response_cache_max_bytes": Range(1),
}
_ENV_OF = {f.name: f.metadata["env"] for f in fields(Config)}

ENV_VARS: dict[str, str] = {f.metadata["env"]: f.metadata["help"] for f in fields(Config)}
