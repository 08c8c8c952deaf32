"""A stand-in for the speech model's lifecycle, for readiness tests without a checkpoint."""
from __future__ import annotations

__all__ = ["FakeSpeech"]


class FakeSpeech:
    """A stand-in for SpeechRecognizer's lifecycle (what function.http_common.Lifecycle asks of a stage): loading
    until `finish(state)`, which calls the engine's start as the real one does from its loading thread."""

    def __init__(self, config=None, state: tuple[bool, bool, str] = (True, False, "speech model loading: x")):
        self.config = config
        self.state = state
        self.then = None
        self.stopped = False

    def start_loading(self, then=None) -> None:
        self.then = then

    def finish(self, state: tuple[bool, bool, str] = (True, True, "ready")) -> None:
        self.state = state
        if self.then is not None:
            self.then()

    def status(self) -> tuple[bool, bool, str]:
        return self.state

    def shutdown(self, timeout: float = 10.0) -> None:
        self.stopped = True
