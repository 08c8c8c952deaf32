"""Moved to tests/support/asgi.py; kept for the test files that still import this name."""
from support.asgi import *  # noqa: F401,F403
