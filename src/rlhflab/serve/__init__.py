"""Best-of-N serving: an OpenAI-compatible API (completions, chat, streaming) reranked by the
reward model, with request batching, RM scoring, Prometheus metrics and a playground page.
See :mod:`rlhflab.serve.app`."""

from rlhflab.serve.app import APIError, BackgroundServer, ServeError, ServeLimits, create_app, serve

__all__ = ["APIError", "BackgroundServer", "ServeError", "ServeLimits", "create_app", "serve"]
