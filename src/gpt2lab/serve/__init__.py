"""Serving: an OpenAI-compatible HTTP API and a web playground over a batching decode engine.

`gpt2lab serve` runs it; from Python, build the pieces yourself::

    from gpt2lab.serve import Engine, create_app
    app = create_app(Engine(model, tokenizer, max_concurrency=64), tokenizer, model_name="mine")
    # then serve `app` with any ASGI server; uvicorn with gpt2lab's read deadline:
    # uvicorn.Server(gpt2lab.serve.limits.uvicorn_config(app)).run()

The HTTP layer needs FastAPI; the engine alone needs only PyTorch.
"""

__all__ = ["Engine", "SamplingParams", "Update", "create_app"]


def __getattr__(name: str):
    """The engine (PyTorch) and the app (FastAPI), each imported when first used (PEP 562)."""
    if name in ("Engine", "SamplingParams", "Update"):
        from . import engine as module
    elif name == "create_app":
        from . import app as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = getattr(module, name)
    return value
