"""The speech-to-text stage, a model stage like the engine: 16 kHz samples in, a transcript out.

GLM-4.1V takes no audio, so a Whisper-family checkpoint (ASR_MODEL_PATH: a local directory, loaded with transformers'
own `AutoProcessor` + `AutoModelForSpeechSeq2Seq`) transcribes every audio part of a request; the API layer
(function/api/audio_parts.py) replaces each part, in place, by a text part holding its transcript. Without
ASR_MODEL_PATH a request with audio is a 400 saying so and nothing else changes.

`SpeechRecognizer` has the engine's lifecycle: `start_loading()` returns at once, one background thread loads the
model (GPU when present, as DEVICE / DTYPE say), warms it up, then serves; `status()` feeds readiness. It loads
before the engine, not beside it: transformers' `from_pretrained` is not thread-safe (concurrent loads patch the same
globals and leave tied or freshly built weights on the meta device), CUDA-graph capture must not meet another
thread's allocations, and the engine sizes its KV cache from the memory still free, which then excludes this model. Transcription
is batched: parts queued while a batch runs form the next one (up to `MAX_BATCH`), so concurrent requests with audio
share a forward pass without anyone waiting for a batch to fill. Parts up to 30 s are decoded in one window; longer
ones (up to MAX_AUDIO_SECONDS) with Whisper's own sequential long-form decoding. The language is ASR_LANGUAGE, or
detected per part (Whisper's language-id step, on the first 30 s) when it is empty; English-only checkpoints
transcribe English.

This module knows no request models and no HTTP. Importing it imports no torch.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from function import metrics
from function.audio import SAMPLE_RATE
from function.config import Config
from function.engine.protocol import FAILED_GRACE_S
from function.errors import EngineDead, GenerationFailed, NotReady, Overloaded, unready

log = logging.getLogger(__name__)

MAX_BATCH = 16
"""Audio parts transcribed in one forward pass."""

WINDOW_SAMPLES = 30 * SAMPLE_RATE
"""Whisper's window: longer parts take the long-form path."""


@dataclass(frozen=True)
class Transcription:
    text: str
    language: str | None    # ISO 639-1 code ("en", "zh"), as Whisper's language tokens name them


@dataclass
class _Job:
    samples: np.ndarray
    future: concurrent.futures.Future


class SpeechRecognizer:
    def __init__(self, config: Config):
        self.config = config
        self.path = config.asr_model_path
        self.phase = "starting"
        self.error: str | None = None
        self._failed_at: float | None = None
        self._ready = False
        self._stopping = False
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._pending = 0
        self._lock = threading.Lock()
        self.processor = self.model = None      # set by the loading thread
        self.device: str | None = None
        self.language: str | None = None        # the configured language code, or None: detect
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ lifecycle
    def start_loading(self, then: Callable[[], None] | None = None) -> None:
        """Load in the background; `then` is called on that thread once loading has succeeded or failed (the
        Function starts the engine's loading there: one model loads at a time)."""
        threading.Thread(target=self._run, args=(then,), name="asr", daemon=True).start()

    def _set_phase(self, phase: str) -> None:
        self.phase = phase
        log.info("asr: %s", phase)

    def _run(self, then: Callable[[], None] | None) -> None:
        t0 = time.perf_counter()
        try:
            self._load()
            if self.config.warmup:
                self._set_phase("warmup")
                self._transcribe_batch([np.zeros(SAMPLE_RATE, np.float32)])
            self.timings["total"] = round(time.perf_counter() - t0, 3)
            for k, v in self.timings.items():
                metrics.set_cold_start_phase(f"asr_{k}", v)
        except Exception as e:  # noqa: BLE001 - reported through readiness, then liveness
            log.exception("speech model load failed")
            self.error = f"{type(e).__name__}: {e}"
            self._failed_at = time.monotonic()
            self._set_phase(f"failed: {self.error}")
            self._fail_queued(EngineDead(f"the speech model failed to load ({self.error})"))
            _call(then)
            return
        self._ready = True
        self._set_phase("ready")
        _call(then)
        self._serve()

    def _load(self) -> None:
        self._set_phase(f"loading: {self.path}")
        t = time.perf_counter()
        import torch
        from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor
        from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

        device = self.config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16, "float32": torch.float32}[self.config.dtype]
        self.processor = AutoProcessor.from_pretrained(self.path)
        model = AutoModelForSpeechSeq2Seq.from_pretrained(self.path, dtype=dtype)
        if model.config.model_type != "whisper":
            raise ValueError(f"ASR_MODEL_PATH={self.path} holds a {model.config.model_type!r} model; a Whisper-family "
                             "checkpoint is needed")
        self.model = model.to(device).eval()
        self.device, self.dtype = device, dtype
        gc = model.generation_config
        self.lang_to_id: dict[str, int] = dict(getattr(gc, "lang_to_id", None) or {})
        self.multilingual = bool(getattr(gc, "is_multilingual", bool(self.lang_to_id))) and bool(self.lang_to_id)
        self.id_to_code = {i: tok[2:-2] for tok, i in self.lang_to_id.items()}
        want = self.config.asr_language.strip().lower()
        if want:
            code = TO_LANGUAGE_CODE.get(want, want)
            known = self.id_to_code.values() if self.multilingual else ("en",)
            if code not in known:
                raise ValueError(f"ASR_LANGUAGE={self.config.asr_language!r} is not a language of {self.path} "
                                 f"({'multilingual' if self.multilingual else 'English-only'})")
            self.language = code
        elif not self.multilingual:
            self.language = "en"
        self.timings["load"] = round(time.perf_counter() - t, 3)
        log.info("speech model %s on %s (%s, %s)", self.path, device, str(dtype).removeprefix("torch."),
                 f"language {self.language}" if self.language else "language detection")

    def status(self) -> tuple[bool, bool, str]:
        """(alive, ready, message), as the engine's; the message says it is the speech model's."""
        if self._failed_at is not None:
            return time.monotonic() - self._failed_at < FAILED_GRACE_S, False, f"speech model {self.phase}"
        if self._stopping:
            return True, False, "shutting down"
        return True, self._ready, "ready" if self._ready else f"speech model {self.phase}"

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._ready = False
        self._queue.put(None)

    # ------------------------------------------------------------------ requests
    def check_ready(self) -> None:
        """NotReady (503, retry soon) while loading or stopping, EngineDead (503) once the load failed."""
        if (error := unready("the speech model", self.status())) is not None:
            raise error

    async def transcribe(self, samples: np.ndarray) -> Transcription:
        """The transcript of 16 kHz mono float32 `samples` (queued into the next batch)."""
        self.check_ready()
        with self._lock:
            if self._pending >= self.config.queue_limit:
                raise Overloaded(f"the speech model is at capacity ({self._pending} parts waiting); retry later",
                                 retry_after=1.0)
            self._pending += 1
        start = time.monotonic()
        try:
            job = _Job(samples, concurrent.futures.Future())
            self._queue.put(job)
            result = await asyncio.wrap_future(job.future)     # cancelling the await cancels the queued job
        finally:
            with self._lock:
                self._pending -= 1
        metrics.observe_asr(time.monotonic() - start, len(samples) / SAMPLE_RATE)
        return result

    def _serve(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                break
            batch = [job]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            batch = [j for j in batch if j.future.set_running_or_notify_cancel()]   # drop abandoned parts
            if batch:
                self._run_batch(batch)
            if stop:
                break
        self._fail_queued(NotReady("the speech model is shutting down", retry_after=1.0))

    def _run_batch(self, batch: list[_Job]) -> None:
        try:
            results = self._transcribe_batch([j.samples for j in batch])
        except Exception as e:  # noqa: BLE001 - e.g. CUDA out of memory: this batch fails, the stage keeps serving
            log.exception("transcription of %d part(s) failed", len(batch))
            for j in batch:
                j.future.set_exception(GenerationFailed(f"transcription failed: {type(e).__name__}"))
            return
        metrics.observe_asr_batch(len(batch))
        for j, r in zip(batch, results):
            j.future.set_result(r)

    def _fail_queued(self, error: Exception) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None and job.future.set_running_or_notify_cancel():
                job.future.set_exception(error)

    def _transcribe_batch(self, audios: list[np.ndarray]) -> list[Transcription]:
        """Short parts (one window) together, long parts together (long-form needs an attention mask and
        timestamps)."""
        out: list[Transcription | None] = [None] * len(audios)
        short = [i for i, a in enumerate(audios) if len(a) <= WINDOW_SAMPLES]
        long = [i for i, a in enumerate(audios) if len(a) > WINDOW_SAMPLES]
        for idx, is_long in ((short, False), (long, True)):
            if idx:
                for i, r in zip(idx, self._generate([audios[i] for i in idx], is_long)):
                    out[i] = r
        return out   # type: ignore[return-value]

    def _generate(self, audios: list[np.ndarray], long: bool) -> list[Transcription]:
        import torch

        fe = self.processor.feature_extractor
        kw = dict(truncation=False, padding="longest") if long else {}
        feats = fe(audios, sampling_rate=SAMPLE_RATE, return_tensors="pt", return_attention_mask=True, **kw)
        x = feats.input_features.to(self.device, self.dtype)
        mask = feats.attention_mask.to(self.device)
        with torch.inference_mode():
            inputs = {"input_features": x, "attention_mask": mask}
            if not long:     # one encoder pass serves language detection and decoding
                inputs = {"encoder_outputs": self.model.get_encoder()(x)}
            if self.language is not None:
                languages = [self.language] * len(audios)
            else:
                ids = self.model.detect_language(**({"input_features": x} if long else inputs))
                languages = [self.id_to_code[i] for i in ids.tolist()]
            gen = {"language": languages, "task": "transcribe"} if self.multilingual else {}
            if long:
                gen["return_timestamps"] = True
            seqs = self.model.generate(**inputs, **gen)
        texts = self.processor.batch_decode(seqs, skip_special_tokens=True)
        return [Transcription(t.strip(), lang) for t, lang in zip(texts, languages)]


def _call(then: Callable[[], None] | None) -> None:
    if then is not None:
        try:
            then()
        except Exception:  # noqa: BLE001 - the caller's hook; the speech model itself is fine
            log.exception("the hook after the speech model's load failed")
