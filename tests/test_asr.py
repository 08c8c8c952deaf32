"""Voice instructions: the tiny Whisper checkpoint, the batched speech-to-text stage, input_audio parts through the
API (the transcript replaces the part in place before the engine sees the chat), the 400s, readiness, metrics, and
one end-to-end run of the real LocalEngine with the tiny GLM-4.1V and the tiny Whisper."""
from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from conftest import BASE, data_url, image_bytes, sse_events
from support.fake_engine import FakeEngine
from support.fake_speech import FakeSpeech
from support.stages import wait_ready
from test_audio import sf_bytes, wav_bytes

from function import metrics
from function.api.app import build_app
from function.asr import SpeechRecognizer, Transcription
from function.audio import SAMPLE_RATE, AudioLoader
from function.config import Config
from function.func import Function
from function.tiny_whisper import BUILDER_VERSION, MARKER_FILE, TIMESTAMP_TOKENS, build_tiny_whisper, special_tokens

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MODEL = "autoglm-phone-9b"


def voice(seconds: float = 2.0, rate: int = 22050, pitch: float = 140.0) -> np.ndarray:
    """A speech-like signal (frames x 1): voiced "syllables" of a few harmonics under a moving formant, with
    pauses, as a synthesized voice instruction."""
    t = np.arange(int(seconds * rate)) / rate
    f0 = pitch * (1 + 0.15 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    formant = 1 + 0.5 * np.sin(2 * np.pi * 3.1 * t)
    x = sum(np.sin(k * phase) * np.exp(-((k * f0 - 700 * formant) / 400) ** 2) for k in range(1, 12))
    envelope = np.clip(np.sin(2 * np.pi * 2.5 * t), 0, None) ** 0.5        # ~5 syllables a second, with gaps
    x = 0.5 * x * envelope / np.abs(x).max()
    return x[:, None].astype(np.float64)


def voice_wav(seconds: float = 2.0, pitch: float = 140.0) -> str:
    return base64.b64encode(wav_bytes(voice(seconds, pitch=pitch), rate=22050)).decode()


def audio_part(data: str, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}


SCREENSHOT = {"type": "image_url", "image_url": {"url": data_url(image_bytes(size=(36, 64)))}}


def voice_message(data: str | None = None, fmt: str = "wav") -> dict:
    """A user turn as a phone agent sends it: the screenshot, then the spoken instruction."""
    return {"role": "user", "content": [SCREENSHOT, audio_part(data or voice_wav(), fmt)]}


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory) -> Path:
    return build_tiny_whisper(tmp_path_factory.mktemp("asr") / "tiny-whisper")


def recognizer_for(whisper_dir: Path, **env) -> SpeechRecognizer:
    r = SpeechRecognizer(Config.from_env({"ASR_MODEL_PATH": str(whisper_dir), **env}))
    r.start_loading()
    return r


@pytest.fixture(scope="module")
def recognizer(whisper_dir):
    r = recognizer_for(whisper_dir)
    wait_ready(r)
    yield r
    r.shutdown()


# ================================================================================================================
# The tiny checkpoint
def test_tiny_whisper_loads_with_the_real_classes_and_pipeline(whisper_dir):
    from transformers import (AutoModelForSpeechSeq2Seq, AutoProcessor, WhisperFeatureExtractor, WhisperProcessor,
                              WhisperTokenizer, pipeline)

    processor = AutoProcessor.from_pretrained(whisper_dir)
    assert isinstance(processor, WhisperProcessor)
    assert isinstance(processor.feature_extractor, WhisperFeatureExtractor)
    tok = processor.tokenizer
    assert isinstance(tok, WhisperTokenizer)
    assert type(WhisperTokenizer.from_pretrained(whisper_dir)) is WhisperTokenizer
    model = AutoModelForSpeechSeq2Seq.from_pretrained(whisper_dir)
    assert type(model).__name__ == "WhisperForConditionalGeneration"
    assert sum(p.numel() for p in model.parameters()) < 1_000_000

    # Whisper's special tokens in Whisper's order: generate() and decode() compute ids from it
    specials = special_tokens()
    ids = tok.convert_tokens_to_ids(specials)
    assert ids == list(range(ids[0], ids[0] + len(specials)))
    assert tok.all_special_ids[-1] == ids[-1]                           # timestamps are not special ...
    assert tok.convert_tokens_to_ids(TIMESTAMP_TOKENS) == list(range(ids[-1] + 1, ids[-1] + 1502))   # ... and follow
    assert len(tok) == model.config.vocab_size
    gc = model.generation_config
    assert gc.decoder_start_token_id == tok.convert_tokens_to_ids("<|startoftranscript|>")
    assert gc.no_timestamps_token_id == tok.convert_tokens_to_ids("<|notimestamps|>")
    assert gc.lang_to_id["<|zh|>"] == tok.convert_tokens_to_ids("<|zh|>") and len(gc.lang_to_id) == 100
    assert gc.task_to_id == {"translate": tok.convert_tokens_to_ids("<|translate|>"),
                             "transcribe": tok.convert_tokens_to_ids("<|transcribe|>")}
    tok.set_prefix_tokens(language="chinese", task="transcribe")
    assert tok.convert_ids_to_tokens(tok.prefix_tokens) == ["<|startoftranscript|>", "<|zh|>", "<|transcribe|>",
                                                            "<|notimestamps|>"]
    text = "打开微信 and open settings"
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text

    asr = pipeline("automatic-speech-recognition", model=str(whisper_dir))
    out = asr({"raw": voice(1.0, rate=16000)[:, 0].astype(np.float32), "sampling_rate": 16000})
    assert isinstance(out["text"], str)


def test_builder_is_idempotent_and_seeded(whisper_dir, tmp_path):
    marker = json.loads((whisper_dir / MARKER_FILE).read_text())
    assert marker["builder_version"] == BUILDER_VERSION and marker["seed"] == 0
    stamp = (whisper_dir / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_whisper(whisper_dir) == whisper_dir                     # no work the second time
    assert (whisper_dir / "model.safetensors").stat().st_mtime_ns == stamp
    t = time.perf_counter()
    again = build_tiny_whisper(tmp_path / "again")
    assert time.perf_counter() - t < 10                                       # ~1 s; generous for a busy CI box
    assert (again / "model.safetensors").read_bytes() == (whisper_dir / "model.safetensors").read_bytes()
    assert not list(tmp_path.glob(".again.*"))                               # no temporary directory left


# ================================================================================================================
# The speech-to-text stage
def samples(seconds: float = 2.0, pitch: float = 140.0) -> np.ndarray:
    return voice(seconds, rate=SAMPLE_RATE, pitch=pitch)[:, 0].astype(np.float32)


async def test_transcribes_with_language_detection(recognizer):
    r = await recognizer.transcribe(samples())
    assert isinstance(r, Transcription) and r.text
    assert r.language in {tok[2:-2] for tok in recognizer.lang_to_id}
    assert await recognizer.transcribe(samples()) == r                         # greedy: the same audio, the same text


async def test_configured_language_is_forced(whisper_dir, recognizer):
    zh = recognizer_for(whisper_dir, ASR_LANGUAGE="chinese", WARMUP="false")
    try:
        wait_ready(zh)
        assert zh.language == "zh"
        r = await zh.transcribe(samples())
        assert r.language == "zh"
    finally:
        zh.shutdown()


@pytest.mark.parametrize("env,fragment", [({"ASR_LANGUAGE": "klingon"}, "ASR_LANGUAGE='klingon'"),
                                          ({}, "not-a-checkpoint")])
def test_load_failures_are_reported(whisper_dir, tmp_path, env, fragment):
    path = whisper_dir if env else tmp_path / "not-a-checkpoint"
    if not env:
        path.mkdir()
    r = recognizer_for(path, WARMUP="false", **env)
    deadline = time.monotonic() + 60
    while "failed" not in r.status()[2]:
        assert time.monotonic() < deadline, r.status()
        time.sleep(0.02)
    alive, ready, message = r.status()
    assert alive and not ready and fragment in message


async def test_concurrent_parts_are_batched_and_match_one_at_a_time(recognizer, monkeypatch):
    clips = [samples(1.0 + 0.5 * i, pitch=110 + 40 * i) for i in range(4)]
    alone = [await recognizer.transcribe(c) for c in clips]
    assert len({a.text for a in alone}) > 1                                 # the noise depends on the audio

    sizes: list[int] = []
    gate = threading.Event()
    real = recognizer._transcribe_batch

    def gated(audios):
        sizes.append(len(audios))
        if len(sizes) == 1:
            gate.wait(10)                       # hold the first batch while the others queue up
        return real(audios)

    monkeypatch.setattr(recognizer, "_transcribe_batch", gated)
    first = asyncio.ensure_future(recognizer.transcribe(clips[0]))
    while not sizes:
        await asyncio.sleep(0.005)
    rest = [asyncio.ensure_future(recognizer.transcribe(c)) for c in clips[1:]]
    await asyncio.sleep(0.05)
    gate.set()
    together = [await first, *await asyncio.gather(*rest)]
    assert sizes == [1, 3]
    assert together == alone


async def test_long_audio_uses_long_form_and_mixes_with_short(recognizer):
    long = samples(35.0)
    short = samples(1.5)
    both = await asyncio.to_thread(recognizer._transcribe_batch, [short, long])
    assert both[0] == (await recognizer.transcribe(short))
    assert both[1] == (await recognizer.transcribe(long))
    assert isinstance(both[1].text, str)


async def test_abandoned_parts_are_skipped(recognizer):
    task = asyncio.ensure_future(recognizer.transcribe(samples(1.0)))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await recognizer.transcribe(samples(1.0))).text      # the stage keeps serving


async def test_not_ready_and_shut_down(whisper_dir):
    r = SpeechRecognizer(Config.from_env({"ASR_MODEL_PATH": str(whisper_dir)}))     # never started
    assert r.status() == (True, False, "speech model starting")
    with pytest.raises(Exception) as e:
        await r.transcribe(samples(0.5))
    assert e.value.kind == "not_ready"
    r.shutdown()
    assert r.status() == (True, False, "shutting down")


# ================================================================================================================
# Through the API (fake engine, real tiny Whisper)
def app_with(engine: FakeEngine, asr: SpeechRecognizer | None, **env):
    return build_app(Config.from_env({k: str(v) for k, v in env.items()}), engine, asr=asr)


@pytest.fixture
def voice_app(engine, recognizer):
    return app_with(engine, recognizer)


async def post(app, body: dict) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
        return await c.post("/v1/chat/completions", json=body)


def oai_client(app) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{BASE}/v1", api_key="EMPTY", max_retries=0,
                              http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=app)))


async def test_openai_sdk_voice_instruction_with_a_screenshot(voice_app, engine, recognizer):
    """The issue's acceptance test: a WAV voice instruction plus a screenshot through the openai SDK; the engine's
    prompt has the transcript where the audio was, and the caller sees the transcript when asked."""
    wav = voice_wav()
    expected = await recognizer.transcribe(AudioLoader(Config()).decode(wav, "wav", "x").samples)
    async with oai_client(voice_app) as client:
        resp = await client.chat.completions.create(
            model=MODEL, max_tokens=50,
            messages=[{"role": "system", "content": "You are a phone agent."},
                      {"role": "user", "content": [
                          {"type": "image_url", "image_url": {"url": SCREENSHOT["image_url"]["url"]}},
                          {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}},
                          {"type": "text", "text": "(spoken)"}]}],
            extra_body={"return_transcript": True})
    assert resp.choices[0].message.content
    (_, chat, _), = engine.calls
    user = chat.messages[1]["content"]
    assert [p["type"] for p in user] == ["image", "text", "text"]              # in place: image, transcript, text
    assert user[1] == {"type": "text", "text": expected.text} and expected.text
    assert user[2] == {"type": "text", "text": "(spoken)"}
    assert len(chat.image_digests) == 1
    (t,) = resp.model_extra["transcripts"]
    assert t == {"message_index": 1, "content_index": 1, "text": expected.text, "language": expected.language,
                 "duration": 2.0}


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (.ci/run installs it)")
@pytest.mark.parametrize("voice_name,text", [("en", "open wechat and send a message to mom"),
                                             ("cmn", "打开微信，给妈妈发消息")])
async def test_real_speech_from_espeak_ng(voice_app, engine, recognizer, voice_name, text):
    """Real synthesized speech as a TTS pipe writes it (`--stdout`: 22.05 kHz WAV with unpatched sizes)."""
    wav = subprocess.run(["espeak-ng", "-v", voice_name, "--stdout", text], capture_output=True, check=True,
                         timeout=30).stdout
    data = base64.b64encode(wav).decode()
    decoded = AudioLoader(Config()).decode(data, "wav", "x")
    assert decoded.source_rate == 22050 and 1.0 < decoded.seconds < 6.0
    expected = await recognizer.transcribe(decoded.samples)
    async with oai_client(voice_app) as client:
        resp = await client.chat.completions.create(model=MODEL, messages=[voice_message(data)],
                                                    extra_body={"return_transcript": True})
    (t,) = resp.model_extra["transcripts"]
    assert t["text"] == expected.text
    assert engine.calls[0][1].messages[0]["content"][1] == {"type": "text", "text": expected.text}


async def test_transcripts_only_when_asked(engine, recognizer):
    plain = await post(app_with(engine, recognizer), {"model": MODEL, "messages": [voice_message()]})
    assert plain.status_code == 200, plain.text
    assert "transcripts" not in plain.json()
    always = app_with(engine, recognizer, RETURN_TRANSCRIPT="true")
    r = await post(always, {"model": MODEL, "messages": [voice_message()]})
    assert r.json()["transcripts"][0]["content_index"] == 1
    r = await post(always, {"model": MODEL, "messages": [voice_message()], "return_transcript": False})
    assert "transcripts" not in r.json()                                  # the request's own choice wins
    r = await post(always, {"model": MODEL, "messages": [{"role": "user", "content": "no audio"}]})
    assert "transcripts" not in r.json()


async def test_stream_carries_transcripts_on_the_first_chunk(voice_app, engine):
    r = await post(voice_app, {"model": MODEL, "stream": True, "return_transcript": True,
                               "messages": [voice_message(), ]})
    assert r.status_code == 200, r.text
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    first, *rest = events[:-1]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    (t,) = first["transcripts"]
    assert t["text"] == engine.calls[0][1].messages[0]["content"][1]["text"]
    assert all("transcripts" not in e for e in rest)


async def test_several_parts_and_messages(voice_app, engine):
    body = {"model": MODEL, "return_transcript": True, "messages": [
        {"role": "user", "content": [audio_part(voice_wav(1.0, pitch=120))]},
        {"role": "assistant", "content": "<answer>do(action=\"Back\")</answer>"},
        {"role": "user", "content": [SCREENSHOT, audio_part(voice_wav(1.5, pitch=200)),
                                     audio_part(voice_wav(1.0, pitch=160))]}]}
    r = await post(voice_app, body)
    assert r.status_code == 200, r.text
    ts = r.json()["transcripts"]
    assert [(t["message_index"], t["content_index"]) for t in ts] == [(0, 0), (2, 1), (2, 2)]
    msgs = engine.calls[0][1].messages
    assert msgs[0]["content"] == [{"type": "text", "text": ts[0]["text"]}]
    assert msgs[2]["content"][1:] == [{"type": "text", "text": ts[1]["text"]}, {"type": "text", "text": ts[2]["text"]}]


async def test_mp3_voice_instruction(voice_app, engine):
    data = base64.b64encode(sf_bytes(voice(2.0), 22050, "MP3")).decode()
    r = await post(voice_app, {"model": MODEL, "return_transcript": True, "messages": [voice_message(data, "mp3")]})
    assert r.status_code == 200, r.text
    assert r.json()["transcripts"][0]["duration"] == pytest.approx(2.0, abs=0.1)


async def test_voice_metrics(voice_app):
    def value(name: str) -> float:
        return metrics.REGISTRY.get_sample_value(name) or 0.0

    before = (value("autoglm_audio_seconds_total"), value("autoglm_asr_latency_seconds_count"),
              value("autoglm_asr_batch_size_count"))
    assert (await post(voice_app, {"model": MODEL, "messages": [voice_message(voice_wav(1.5))]})).status_code == 200
    assert value("autoglm_audio_seconds_total") == pytest.approx(before[0] + 1.5)
    assert value("autoglm_asr_latency_seconds_count") == before[1] + 1
    assert value("autoglm_asr_batch_size_count") >= before[2] + 1
    body, _ = metrics.render()
    assert b"autoglm_asr_latency_seconds_bucket" in body


# --- errors
def assert_400(r: httpx.Response, fragment: str, param: str | None = None) -> dict:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_request" and fragment in err["message"], err
    if param is not None:
        assert err["param"] == param, err
    return err


async def test_audio_without_an_asr_model_is_a_clear_400(engine):
    app = app_with(engine, None)
    r = await post(app, {"model": MODEL, "messages": [voice_message()]})
    assert_400(r, "ASR_MODEL_PATH", "messages[0].content[1]")
    assert engine.calls == []
    ok = await post(app, {"model": MODEL, "messages": [{"role": "user", "content": [SCREENSHOT]}]})
    assert ok.status_code == 200                                            # everything else is unaffected


@pytest.mark.parametrize("env,part,fragment,param", [
    ({}, audio_part(voice_wav(), "aac"), "not supported", "messages[0].content[1].input_audio.format"),
    ({}, audio_part("not base64!"), "base64", "messages[0].content[1].input_audio.data"),
    ({"MAX_AUDIO_BYTES": 1000}, audio_part(voice_wav()), "MAX_AUDIO_BYTES", "messages[0].content[1].input_audio.data"),
    ({"MAX_AUDIO_SECONDS": 1}, audio_part(voice_wav(2.0)), "MAX_AUDIO_SECONDS", "messages[0].content[1].input_audio"),
    ({}, audio_part(voice_wav()[:4000]), "truncated", "messages[0].content[1].input_audio"),
    ({}, audio_part(base64.b64encode(b"GIF89a not audio" * 20).decode()), "not a WAV",
     "messages[0].content[1].input_audio"),
])
async def test_bad_audio_is_a_400(engine, recognizer, env, part, fragment, param):
    r = await post(app_with(engine, recognizer, **env), {"model": MODEL, "messages": [
        {"role": "user", "content": [SCREENSHOT, part]}]})
    assert_400(r, fragment, param)
    assert engine.calls == []


async def test_audio_outside_user_messages_and_too_many_parts(voice_app, engine):
    r = await post(voice_app, {"model": MODEL, "messages": [
        {"role": "system", "content": [audio_part(voice_wav(0.5))]}, {"role": "user", "content": "hi"}]})
    assert_400(r, "audio is only accepted in user messages", "messages[0]")
    r = await post(voice_app, {"model": MODEL, "messages": [
        {"role": "user", "content": [audio_part(voice_wav(0.2))] * 9}]})
    assert_400(r, "9 audio parts", "messages")
    r = await post(voice_app, {"model": MODEL, "messages": [
        {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "x"}}]}]})
    assert_400(r, "Field required", "messages[0].content[0].input_audio.format")
    assert engine.calls == []


async def test_speech_model_not_ready_is_503(engine, whisper_dir):
    loading = SpeechRecognizer(Config.from_env({"ASR_MODEL_PATH": str(whisper_dir)}))   # not started
    r = await post(app_with(engine, loading), {"model": MODEL, "messages": [voice_message()]})
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
    assert "speech model" in r.json()["error"]["message"] and r.headers["Retry-After"]


# ================================================================================================================
# Readiness through the Function
def test_function_loads_the_speech_model_first_and_readiness_waits_for_both():
    engines, asrs = [], []
    fn = Function(engine_factory=lambda c: engines.append(FakeEngine(ready=False)) or engines[-1],
                  asr_factory=lambda c: asrs.append(FakeSpeech(c)) or asrs[-1])
    fn.start({"ASR_MODEL_PATH": "/models/whisper"})
    (engine,), (asr,) = engines, asrs
    assert asr.then is not None and asr.config.asr_model_path == "/models/whisper"
    assert not engine.loading_started                          # one model load at a time: the speech model first
    assert fn.ready() == (False, "speech model loading: x") and fn.alive() == (True, "speech model loading: x")
    asr.finish()
    assert engine.loading_started
    assert fn.ready() == (False, "loading: weights")             # then the engine's phases
    engine.finish_loading()
    assert fn.ready() == (True, "ready") and fn.alive() == (True, "ready")
    asr.state = (False, False, "speech model failed: boom")
    assert fn.alive() == (False, "speech model failed: boom") and fn.ready()[0] is False
    fn.stop()
    assert asr.stopped and engine.shut_down


def test_a_failed_speech_model_still_starts_the_engine_and_holds_readiness():
    engines, asrs = [], []
    fn = Function(engine_factory=lambda c: engines.append(FakeEngine()) or engines[-1],
                  asr_factory=lambda c: asrs.append(FakeSpeech(c)) or asrs[-1])
    fn.start({"ASR_MODEL_PATH": "/models/whisper"})
    asrs[0].finish((True, False, "speech model failed: OSError: no such checkpoint"))
    assert engines[0].loading_started
    assert fn.ready() == (False, "speech model failed: OSError: no such checkpoint")


async def test_real_speech_model_loads_then_calls_back(whisper_dir):
    called = threading.Event()
    r = SpeechRecognizer(Config.from_env({"ASR_MODEL_PATH": str(whisper_dir), "WARMUP": "false"}))
    r.start_loading(then=lambda: called.set() if r.status()[1] else None)
    assert await asyncio.to_thread(called.wait, 60)             # called once ready
    r.shutdown()


def test_function_without_asr_builds_none():
    asrs = []
    fn = Function(engine_factory=lambda c: FakeEngine(), asr_factory=lambda c: asrs.append(c))
    fn.start({})
    assert asrs == [] and fn.ready() == (True, "ready")


# ================================================================================================================
# End to end: the real LocalEngine (tiny GLM-4.1V) and the tiny Whisper, through the Function
async def test_end_to_end_real_engine_and_tiny_whisper(model_cache_dir, whisper_dir):
    from function.engine.client import LocalEngine
    from function.engine.loader import load_processor

    seen = []

    class RecordingEngine(LocalEngine):
        def generate(self, request_id, chat, params):
            seen.append(chat)
            return super().generate(request_id, chat, params)

    fn = Function(engine_factory=RecordingEngine)
    fn.start({"MODEL_CACHE_DIR": str(model_cache_dir), "MAX_NUM_SEQS": "2", "MAX_MODEL_LEN": "2048",
              "WARMUP": "false", "ASR_MODEL_PATH": str(whisper_dir), "RETURN_TRANSCRIPT": "true"})
    try:
        deadline = time.monotonic() + 300
        while not fn.ready()[0]:
            assert fn.alive()[0], fn.alive()[1]
            assert time.monotonic() < deadline, f"not ready after 300 s: {fn.ready()[1]}"
            await asyncio.sleep(0.1)
        async with oai_client(fn.handle) as client:
            resp = await client.chat.completions.create(
                model=MODEL, max_tokens=4, temperature=0,
                messages=[{"role": "system", "content": "You are a phone agent."}, voice_message()])
        assert resp.choices[0].finish_reason in ("stop", "length") and resp.usage.completion_tokens <= 4
        (t,) = resp.model_extra["transcripts"]
        assert t["text"] and t["duration"] == 2.0
        (chat,) = seen
        assert chat.messages[1]["content"][1] == {"type": "text", "text": t["text"]}
        prompt = load_processor(Config.from_env({"MODEL_CACHE_DIR": str(model_cache_dir)}).tiny_model_dir) \
            .apply_chat_template(chat.messages, tokenize=False, add_generation_prompt=True)
        assert f"<|begin_of_image|><|image|><|end_of_image|>{t['text']}" in prompt   # where the audio was
    finally:
        fn.stop()
