"""Serving: an OpenAI-compatible HTTP API and a web playground over a batching decode engine.

`gpt2lab serve` runs it; from Python, build the pieces yourself::

    from gpt2lab.serve import Engine, create_app
    app = create_app(Engine(model, tokenizer, max_concurrency=64), tokenizer, model_name="mine")
    # then serve `app` with any ASGI server; uvicorn with gpt2lab's read deadline:
    # uvicorn.Server(gpt2lab.serve.limits.uvicorn_config(app)).run()

The HTTP layer needs FastAPI; the engine alone needs only PyTorch.
"""

from .engine import Engine, SamplingParams, Update


def create_app(*args, **kwargs):
    """See `gpt2lab.serve.app.create_app` (imported on use: it needs FastAPI)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)


__all__ = ["Engine", "SamplingParams", "Update", "create_app"]
