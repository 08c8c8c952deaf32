"""Turning an OpenAI `input_audio` part into checked 16 kHz mono float32 samples for the speech-to-text stage.

`input_audio.data` is base64 (a `data:audio/...;base64,` prefix is tolerated); `input_audio.format` must be one of
the formats the installed decoder really reads: wav, mp3, flac and ogg (Vorbis or Opus) with libsndfile
(`soundfile`), only PCM wav with the standard library's `wave` where soundfile is missing (`FORMATS`). As for images,
the declared format only has to be supported: the bytes must really be one of those containers, whatever the label.

Every part is capped in bytes before it is decoded (MAX_AUDIO_BYTES) and in duration before its samples are decoded
(MAX_AUDIO_SECONDS, from the header); decoding reads at most that many frames, so a lying header cannot make it read
more. Sample rates from 8 kHz to 192 kHz are resampled to 16 kHz (`scipy.signal.resample_poly`, polyphase with an
anti-alias filter; linear interpolation where scipy is missing), channels are averaged. Data that is not audio, is
empty, corrupt or truncated (fewer samples than its header declares) is refused. Decoding runs in a worker thread.
Every refusal is an `InvalidInput` (HTTP 400) naming the offending part.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import math
import wave
from dataclasses import dataclass

import numpy as np

from function.config import Config
from function.errors import InvalidInput

try:
    import soundfile
except (ImportError, OSError):     # OSError: the package is there but libsndfile is not
    soundfile = None

SAMPLE_RATE = 16_000
MIN_SOURCE_RATE = 8_000
MAX_SOURCE_RATE = 192_000
MAX_CHANNELS = 8
MAX_PARTS = 8
"""Audio parts in one request."""

# declared format -> libsndfile container names accepted for it
_SOUNDFILE_FORMATS = {"wav": ("WAV", "WAVEX"), "mp3": ("MP3",), "flac": ("FLAC",), "ogg": ("OGG",)}


def supported_formats() -> tuple[str, ...]:
    """The `input_audio.format` values this installation decodes."""
    if soundfile is None:
        return ("wav",)
    have = soundfile.available_formats()
    return tuple(f for f, containers in _SOUNDFILE_FORMATS.items() if containers[0] in have)


FORMATS = supported_formats()


@dataclass(frozen=True)
class DecodedAudio:
    samples: np.ndarray     # float32, mono, SAMPLE_RATE, in [-1, 1]
    source_rate: int        # the sample rate of the file

    @property
    def seconds(self) -> float:
        return len(self.samples) / SAMPLE_RATE


class AudioLoader:
    def __init__(self, config: Config):
        self.max_bytes = config.max_audio_bytes
        self.max_seconds = config.max_audio_seconds

    async def load(self, data: str, fmt: str, param: str) -> DecodedAudio:
        """The decoded audio of one part; `param` names it in errors (e.g. messages[0].content[1].input_audio)."""
        fmt = fmt.strip().lower()
        if fmt not in FORMATS:
            raise InvalidInput(f"input_audio format {fmt!r} is not supported; use one of {', '.join(FORMATS)}",
                               param=f"{param}.format")
        return await asyncio.to_thread(self.decode, data, fmt, param)

    def decode(self, data: str, fmt: str, param: str) -> DecodedAudio:
        raw = self._from_base64(data, f"{param}.data")
        if soundfile is None:
            samples, rate = self._decode_wave(raw, param)
        else:
            samples, rate = self._decode_soundfile(raw, param)
        if len(samples) == 0:
            raise InvalidInput("audio contains no samples", param=param)
        return DecodedAudio(resample(samples, rate), rate)

    def _from_base64(self, data: str, param: str) -> bytes:
        if data.startswith("data:"):
            header, sep, data = data.partition(",")
            if not sep or not header.lower().endswith(";base64"):
                raise InvalidInput("input_audio data must be base64", param=param)
        if len(data) * 3 // 4 > self.max_bytes:            # cheap bound, checked before decoding anything
            raise InvalidInput(f"audio is {len(data) * 3 // 4} bytes; the limit is {self.max_bytes} bytes "
                               "(MAX_AUDIO_BYTES)", param=param)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput("input_audio data is not valid base64", param=param) from None
        if not raw:
            raise InvalidInput("input_audio data is empty", param=param)
        return raw

    def _check_header(self, frames: int, rate: int, channels: int, param: str) -> int:
        """The most frames decoding may read; refuses what the header already tells is out of bounds."""
        if not MIN_SOURCE_RATE <= rate <= MAX_SOURCE_RATE:
            raise InvalidInput(f"audio sample rate {rate} Hz is outside {MIN_SOURCE_RATE}..{MAX_SOURCE_RATE} Hz",
                               param=param)
        if not 1 <= channels <= MAX_CHANNELS:
            raise InvalidInput(f"audio has {channels} channels; at most {MAX_CHANNELS} are accepted", param=param)
        limit = math.floor(self.max_seconds * rate)
        if frames > limit:
            raise self._too_long(frames / rate, param)
        return limit

    def _too_long(self, seconds: float, param: str) -> InvalidInput:
        return InvalidInput(f"audio is {seconds:.1f} s long; the limit is {self.max_seconds:g} s (MAX_AUDIO_SECONDS)",
                            param=param)

    def _decode_soundfile(self, raw: bytes, param: str) -> tuple[np.ndarray, int]:
        accepted = {c for f in FORMATS for c in _SOUNDFILE_FORMATS[f]}
        try:
            f = soundfile.SoundFile(io.BytesIO(raw))
        except Exception:   # libsndfile's errors for data it cannot open; all mean the same to the client
            raise InvalidInput(f"audio data is not a {_names()} file, or it is corrupt", param=param) from None
        with f:
            if f.format not in accepted:
                raise InvalidInput(f"audio data is {f.format} audio; accepted: {_names()}", param=param)
            limit = self._check_header(f.frames, f.samplerate, f.channels, param)
            mono, n = [], 0
            try:    # in blocks, downmixed as they come: memory stays at the mono signal's size
                while n <= limit:
                    block = f.read(frames=min(1 << 16, limit + 1 - n), dtype="float32", always_2d=True)
                    if not len(block):
                        break
                    mono.append(_mono(block))
                    n += len(block)
            except Exception:
                raise InvalidInput("audio data is corrupt", param=param) from None
            declared, rate, container = f.frames, f.samplerate, f.format
        samples = np.concatenate(mono) if mono else np.zeros(0, np.float32)
        if len(samples) > limit:
            raise self._too_long(len(samples) / rate, param)
        # libsndfile shortens a WAV's length to the bytes present, and decodes what it can of a cut-off MP3
        if len(samples) < declared or (container in ("WAV", "WAVEX") and _riff_truncated(raw)):
            raise InvalidInput("audio data is truncated", param=param)
        return samples, rate

    def _decode_wave(self, raw: bytes, param: str) -> tuple[np.ndarray, int]:
        try:
            w = wave.open(io.BytesIO(raw))
        except (wave.Error, EOFError):
            raise InvalidInput("audio data is not a PCM WAV file, or it is corrupt", param=param) from None
        with w:
            rate, channels, width, frames = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
            data = _riff_data(raw)
            if data is not None and data[0] is None:        # streamed: the frames present, not the placeholder
                frames = data[1] // (channels * width)
            limit = self._check_header(frames, rate, channels, param)
            pcm = w.readframes(min(frames, limit + 1))
        if len(pcm) < frames * channels * width or _riff_truncated(raw):
            raise InvalidInput("audio data is truncated", param=param)
        return _mono(_pcm_to_float(pcm, width).reshape(-1, channels)), rate


def _names() -> str:
    return ", ".join(f.upper() if f != "ogg" else "Ogg" for f in FORMATS)


def _riff_data(raw: bytes) -> tuple[int | None, int] | None:
    """(declared, present) bytes of a RIFF/WAVE file's data chunk; declared is None for a stream of unknown length
    (writers to a pipe leave 0xFFFFFFFF or a ~2 GiB placeholder such as espeak-ng's and sox's 0x7FFFF000).
    None: not a RIFF/WAVE file with a data chunk."""
    if raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        return None
    pos = 12
    while pos + 8 <= len(raw):
        size = int.from_bytes(raw[pos + 4:pos + 8], "little")
        if raw[pos:pos + 4] == b"data":
            present = len(raw) - pos - 8
            return (None if size >= 0x7FFF0000 else size), present
        pos += 8 + size + (size & 1)
    return None


def _riff_truncated(raw: bytes) -> bool:
    """Whether a RIFF/WAVE file's data chunk declares more bytes than the file has."""
    data = _riff_data(raw)
    return data is not None and data[0] is not None and data[0] > data[1]


def _pcm_to_float(pcm: bytes, width: int) -> np.ndarray:
    if width == 1:                              # 8-bit WAV is unsigned
        return (np.frombuffer(pcm, np.uint8).astype(np.float32) - 128.0) / 128.0
    if width == 3:                              # 24-bit: widen to 32 bits
        b = np.frombuffer(pcm, np.uint8).reshape(-1, 3)
        pcm = np.concatenate([np.zeros((len(b), 1), np.uint8), b], axis=1).tobytes()
        width = 4
    ints = np.frombuffer(pcm, {2: "<i2", 4: "<i4"}[width])
    return ints.astype(np.float32) / float(2 ** (8 * width - 1))


def _mono(block: np.ndarray) -> np.ndarray:
    x = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0]
    return np.clip(np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0).astype(np.float32, copy=False)


def resample(x: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """`x` at `rate` Hz resampled to `target` Hz (float32)."""
    if rate == target:
        return np.ascontiguousarray(x, dtype=np.float32)
    try:
        from scipy.signal import resample_poly
    except ImportError:
        n = max(1, round(len(x) * target / rate))
        return np.interp(np.arange(n) * (rate / target), np.arange(len(x)), x).astype(np.float32)
    g = math.gcd(rate, target)
    return resample_poly(x, target // g, rate // g).astype(np.float32)
