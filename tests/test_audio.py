"""Decoding input_audio parts: the formats the decoder really reads, resampling to 16 kHz mono, and every refusal
(bad base64, bytes, duration, sample rate, not audio, truncated) as a 400 naming the part."""
from __future__ import annotations

import base64
import io
import sys
import wave

import numpy as np
import pytest

from function import audio
from function.audio import SAMPLE_RATE, AudioLoader, resample
from function.errors import InvalidInput

soundfile = pytest.importorskip("soundfile")
PARAM = "messages[0].content[1].input_audio"


def tone(seconds: float = 1.0, rate: int = 16000, channels: int = 1, freq: float = 440.0) -> np.ndarray:
    """A sine (frames x channels), channel k at freq * (k + 1)."""
    t = np.arange(int(seconds * rate)) / rate
    return np.stack([0.4 * np.sin(2 * np.pi * freq * (k + 1) * t) for k in range(channels)], axis=1)


def wav_bytes(x: np.ndarray, rate: int = 16000, width: int = 2) -> bytes:
    """PCM WAV written with the standard library (width 1: unsigned 8-bit, 2: 16-bit, 3: 24-bit, 4: 32-bit)."""
    if width == 1:
        pcm = np.round(x * 127 + 128).astype(np.uint8).tobytes()
    else:
        ints = np.round(x * (2 ** (8 * width - 1) - 1)).astype("<i4")
        pcm = ints.astype("<i2").tobytes() if width == 2 else \
            ints.tobytes() if width == 4 else np.frombuffer(ints.tobytes(), np.uint8).reshape(-1, 4)[:, :3].tobytes()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(x.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(pcm)
    return buf.getvalue()


def sf_bytes(x: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def loader(make_config) -> AudioLoader:
    return AudioLoader(make_config(MAX_AUDIO_SECONDS=5, MAX_AUDIO_BYTES=2_000_000))


def refused(loader: AudioLoader, data: str, fmt: str = "wav") -> InvalidInput:
    with pytest.raises(InvalidInput) as e:
        loader.decode(data, fmt, PARAM)
    assert e.value.kind == "invalid_request"
    return e.value


# --- what is accepted
def test_formats_are_what_libsndfile_reads():
    assert audio.FORMATS[:2] == ("wav", "mp3")          # OpenAI's two, first
    assert set(audio.FORMATS) <= {"wav", "mp3", "flac", "ogg"}


def test_wav_16k_mono_is_passed_through(loader):
    x = tone(1.5)
    a = loader.decode(b64(wav_bytes(x)), "wav", PARAM)
    assert a.samples.dtype == np.float32 and a.samples.ndim == 1
    assert a.source_rate == 16000 and a.seconds == 1.5
    np.testing.assert_allclose(a.samples, x[:, 0], atol=1e-4)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_wav_sample_widths(loader, width):
    x = tone(0.5)
    a = loader.decode(b64(wav_bytes(x, width=width)), "wav", PARAM)
    np.testing.assert_allclose(a.samples, x[:, 0], atol=1.5 / 127 if width == 1 else 1e-3)


def test_stereo_44k1_is_downmixed_and_resampled(loader):
    x = tone(2.0, rate=44100, channels=2, freq=300)
    a = loader.decode(b64(wav_bytes(x, rate=44100)), "wav", PARAM)
    assert a.source_rate == 44100
    assert len(a.samples) == 2 * SAMPLE_RATE
    expected = tone(2.0, rate=16000, channels=2, freq=300).mean(axis=1)
    np.testing.assert_allclose(a.samples[200:-200], expected[200:-200], atol=0.02)   # polyphase, no aliasing


@pytest.mark.parametrize("fmt,subtype,rate", [("MP3", None, 22050), ("FLAC", None, 48000),
                                              ("OGG", "VORBIS", 16000), ("OGG", "OPUS", 48000)])
def test_compressed_formats(loader, fmt, subtype, rate):
    name = fmt.lower()
    if name not in audio.FORMATS:
        pytest.skip(f"libsndfile here reads no {fmt}")
    a = loader.decode(b64(sf_bytes(tone(2.0, rate=rate), rate, fmt, subtype)), name, PARAM)
    assert abs(a.seconds - 2.0) < 0.1
    assert 0.2 < float(np.abs(a.samples).max()) <= 1.0


def test_declared_format_need_not_match_the_bytes(loader):
    """As for images: the label must be a supported format and the bytes a supported container."""
    a = loader.decode(b64(wav_bytes(tone(1.0))), "mp3", PARAM)
    assert a.seconds == 1.0


def test_data_url_prefix_is_tolerated(loader):
    a = loader.decode("data:audio/wav;base64," + b64(wav_bytes(tone(0.25))), "wav", PARAM)
    assert a.seconds == 0.25


def streamed(data: bytes, placeholder: int) -> bytes:
    """The WAV as a recorder writing to a pipe leaves it: sizes never patched."""
    out = bytearray(data)
    pos = out.index(b"data")
    out[pos + 4:pos + 8] = placeholder.to_bytes(4, "little")
    out[4:8] = placeholder.to_bytes(4, "little")
    return bytes(out)


@pytest.mark.parametrize("placeholder", [0xFFFFFFFF, 0x7FFFF000])   # 0x7FFFF000: espeak-ng --stdout, sox
def test_streamed_wav_with_unknown_length_is_accepted(loader, placeholder):
    a = loader.decode(b64(streamed(wav_bytes(tone(0.5)), placeholder)), "wav", PARAM)
    assert a.seconds == pytest.approx(0.5, abs=0.01)


# --- refusals
async def test_unsupported_format_names_the_choices(loader):
    with pytest.raises(InvalidInput) as e:
        await loader.load(b64(wav_bytes(tone(0.2))), "aac", PARAM)
    assert e.value.param == PARAM + ".format"
    assert "'aac'" in e.value.message and "wav" in e.value.message


@pytest.mark.parametrize("data,fragment", [("UklGR$$$", "base64"), ("", "empty"), ("data:audio/wav,raw", "base64")])
def test_bad_base64(loader, data, fragment):
    e = refused(loader, data)
    assert fragment in e.message and e.param == PARAM + ".data"


def test_byte_cap_is_checked_before_decoding(make_config):
    small = AudioLoader(make_config(MAX_AUDIO_BYTES=1000))
    e = refused(small, "!" * 2000)                       # not even base64: the size is refused first
    assert "MAX_AUDIO_BYTES" in e.message and e.param == PARAM + ".data"


def test_duration_cap(loader):
    e = refused(loader, b64(wav_bytes(tone(6.0, rate=8000), rate=8000)))
    assert "6.0 s" in e.message and "MAX_AUDIO_SECONDS" in e.message and e.param == PARAM


def test_duration_cap_mp3(loader):
    if "mp3" not in audio.FORMATS:
        pytest.skip("no MP3 decoder")
    data = sf_bytes(tone(7.0, rate=16000), 16000, "MP3")
    e = refused(loader, b64(data), "mp3")
    assert "MAX_AUDIO_SECONDS" in e.message


@pytest.mark.parametrize("rate", [4000, 200000])
def test_sample_rate_bounds(loader, rate):
    e = refused(loader, b64(wav_bytes(tone(0.5, rate=rate), rate=rate)))
    assert f"{rate} Hz" in e.message


def test_not_audio(loader):
    assert "not a WAV" in refused(loader, b64(b"this is not audio at all, just text" * 10)).message


def test_other_containers_are_refused(loader):
    e = refused(loader, b64(sf_bytes(tone(0.5), 16000, "AIFF")))
    assert "AIFF" in e.message


def test_empty_wav(loader):
    assert "no samples" in refused(loader, b64(wav_bytes(tone(0.0)))).message


@pytest.mark.parametrize("make", [
    lambda: wav_bytes(tone(1.0)),
    lambda: sf_bytes(tone(1.0), 16000, "FLAC"),
    lambda: sf_bytes(tone(2.0, rate=22050), 22050, "MP3"),
    lambda: sf_bytes(tone(1.0), 16000, "OGG", "VORBIS"),
], ids=["wav", "flac", "mp3", "ogg"])
def test_truncated(loader, make):
    data = make()
    e = refused(loader, b64(data[:len(data) // 2]))
    assert "truncated" in e.message or "corrupt" in e.message


def test_too_many_channels(loader):
    data = sf_bytes(tone(0.2, channels=10), 16000, "WAV", "PCM_16")
    assert "10 channels" in refused(loader, b64(data)).message


# --- without soundfile or scipy
@pytest.fixture
def no_soundfile(monkeypatch):
    monkeypatch.setattr(audio, "soundfile", None)
    monkeypatch.setattr(audio, "FORMATS", audio.supported_formats())
    assert audio.FORMATS == ("wav",)


@pytest.mark.usefixtures("no_soundfile")
async def test_stdlib_wave_fallback(loader):
    x = tone(1.0, rate=22050, channels=2)
    for width in (1, 2, 3, 4):
        a = loader.decode(b64(wav_bytes(x, rate=22050, width=width)), "wav", PARAM)
        assert len(a.samples) == SAMPLE_RATE and a.source_rate == 22050
    data = wav_bytes(x, rate=22050)
    assert "truncated" in refused(loader, b64(data[:-1000])).message
    assert loader.decode(b64(streamed(data, 0x7FFFF000)), "wav", PARAM).seconds == 1.0
    assert "not a PCM WAV" in refused(loader, b64(b"RIFF....WAVEjunk")).message
    assert "MAX_AUDIO_SECONDS" in refused(loader, b64(wav_bytes(tone(6.0, rate=8000), rate=8000))).message
    with pytest.raises(InvalidInput, match="'mp3' is not supported"):
        await loader.load(b64(data), "mp3", PARAM)


def test_resampling_without_scipy(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.signal", None)      # import fails: linear interpolation
    x = tone(1.0, rate=8000, freq=200)[:, 0].astype(np.float32)
    y = resample(x, 8000)
    assert len(y) == SAMPLE_RATE and y.dtype == np.float32
    np.testing.assert_allclose(y[::2][:-1], x[:-1], atol=1e-6)
