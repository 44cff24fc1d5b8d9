"""Deployment: `jax.export` artifacts of a trained model's predictor (`export`), and an
OpenAI-compatible server with continuous batching (`Engine`, `make_app`, `serve`).

The server's names load lazily: importing `jaxnv.serve` needs neither FastAPI nor JAX's model
code until they are used.
"""

_LAZY = {
    "Engine": "jaxnv.serve.engine",
    "Event": "jaxnv.serve.engine",
    "RequestError": "jaxnv.serve.engine",
    "SamplingParams": "jaxnv.serve.engine",
    "LanguageModel": "jaxnv.serve.loading",
    "load_lm": "jaxnv.serve.loading",
    "make_app": "jaxnv.serve.server",
    "serve": "jaxnv.serve.server",
    "start_in_thread": "jaxnv.serve.server",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxnv.serve' has no attribute {name!r}")
