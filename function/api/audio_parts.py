"""`input_audio` parts become instruction text before the chat template is applied: the API side of the speech
stage (function/asr.py), which takes samples and returns transcripts and knows no request models."""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from function.audio import MAX_PARTS, AudioLoader
from function.errors import InvalidInput

from .protocol import AudioPart, AudioTranscript, ChatCompletionRequest, TextPart

if TYPE_CHECKING:
    from function.asr import SpeechRecognizer


async def transcribe_audio_parts(request: ChatCompletionRequest, loader: AudioLoader,
                                 recognizer: SpeechRecognizer | None
                                 ) -> tuple[ChatCompletionRequest, list[AudioTranscript]]:
    """`request` with every `input_audio` part replaced, in place, by a text part holding its transcript, and the
    transcripts (in message and part order). A request without audio comes back as it is."""
    found = [(i, j, p) for i, m in enumerate(request.messages) if isinstance(m.content, list)
             for j, p in enumerate(m.content) if isinstance(p, AudioPart)]
    if not found:
        return request, []
    i, j, _ = found[0]
    if recognizer is None:
        raise InvalidInput("audio input is not enabled on this server: it has no speech-recognition model "
                           "(ASR_MODEL_PATH is not set); send the instruction as text",
                           param=f"messages[{i}].content[{j}]")
    if len(found) > MAX_PARTS:
        raise InvalidInput(f"{len(found)} audio parts in one request; the limit is {MAX_PARTS}", param="messages")
    recognizer.check_ready()       # refuse before decoding anything
    decoded = await asyncio.gather(*(loader.load(p.input_audio.data, p.input_audio.format,
                                                 param=f"messages[{i}].content[{j}].input_audio")
                                     for i, j, p in found))
    results = await asyncio.gather(*(recognizer.transcribe(a.samples) for a in decoded))
    by_part = {(i, j): r for (i, j, _), r in zip(found, results)}
    messages = list(request.messages)
    for i in sorted({i for i, _, _ in found}):
        m = messages[i]
        content = [TextPart(type="text", text=by_part[(i, j)].text) if (i, j) in by_part else p
                   for j, p in enumerate(m.content)]
        messages[i] = m.model_copy(update={"content": content})
    transcripts = [AudioTranscript(message_index=i, content_index=j, text=r.text, language=r.language,
                                   duration=round(a.seconds, 3))
                   for (i, j, _), r, a in zip(found, results, decoded)]
    return request.model_copy(update={"messages": messages}), transcripts
