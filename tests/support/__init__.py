"""Test helpers shared by the test files, imported as `support.<module>` (tests/ is on sys.path, as for conftest):

- `fake_engine`: `FakeEngine`, a deterministic EngineClient (no model), and `answer_for`, the text it writes;
- `fake_speech`: `FakeSpeech`, the speech model's lifecycle (loading until told, then ready or failed);
- `asgi`: `call_asgi`, one request driven through an ASGI app by hand with a client that disconnects on cue, and
  `until`, a wait on observable state (no fixed sleeps);
- `http_stub`: `StubHandler` and `serving`, loopback HTTP stand-ins (an image host, the model service, the API
  server's OIDC keys);
- `stages`: `wait_ready`, the wait for a stage that loads in the background (LocalEngine, SpeechRecognizer), and
  `running`, a stage loaded for a `with` block and shut down after.
"""
