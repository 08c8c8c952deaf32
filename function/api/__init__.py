"""The OpenAI-compatible HTTP layer: wire format, errors, reasoning split, serving and the FastAPI app."""
