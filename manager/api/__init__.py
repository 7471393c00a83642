"""The CloudStack-compatible HTTP API (``/client/api``).

- :mod:`manager.api.signing` — v1 and v3 request signatures (pure).
- :mod:`manager.api.responses` — response and error shapes (pure).
- :mod:`manager.api.dispatch` — command registry and parameter specs; read its docstring to
  add a command.
- :mod:`manager.api.commands` — the commands, one module per area.
- :mod:`manager.api.jobs` — async jobs.
- :mod:`manager.api.server` — the aiohttp handler; :func:`setup_api` mounts it.
"""

from __future__ import annotations

from manager.api.server import API_SERVER, JOB_RUNNER, setup_api

__all__ = ["API_SERVER", "JOB_RUNNER", "setup_api"]
