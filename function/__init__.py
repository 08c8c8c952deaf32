"""AutoGLM-Phone-9B behind an OpenAI-compatible API, as a Knative Python function (func-python's `new`)."""
from .func import new

__all__ = ["new"]
