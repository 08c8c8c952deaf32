"""Moved to tests/support/ (fake_engine, fake_speech); kept for the test files that still import this name."""
from support.fake_engine import *  # noqa: F401,F403
from support.fake_speech import *  # noqa: F401,F403
