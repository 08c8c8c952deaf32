"""AutoGLM-Phone-9B behind an OpenAI-compatible API, as a Knative Python function (func-python's `new`).

`new` is imported on first use (PEP 562), so `import function.engine.loader` (the engine, scripts, the bench) does
not load FastAPI and the API layer through this package's __init__."""

__all__ = ["new"]


def __getattr__(name: str):
    if name == "new":
        from .func import new
        return new
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
