"""The OpenAI-compatible HTTP API (and the swarm's web page) that `swarm api` serves: a library of
its own, which the command only configures.

- :mod:`swarm.api.app`: the Starlette app, its routes and :func:`serve_api` (bind, serve until
  interrupted).
- :mod:`swarm.api.backend`: :class:`ApiConfig` and :class:`Backend` (the client's head, one
  persistent swarm client or local blocks) and each request's generation, its threads and its
  cancellation.
- :mod:`swarm.api.requests`: OpenAI's request bodies checked field by field.
- ``static/``: the web page (plain HTML, CSS and JS).
"""

from swarm.api.app import create_app, make_server, serve_api
from swarm.api.backend import ApiConfig, Backend

__all__ = ["ApiConfig", "Backend", "create_app", "make_server", "serve_api"]
