"""``sysvm-agent`` on the standard asyncio event loop instead of uvloop (the same code
otherwise). Why: under uvloop a subprocess's stdout/stderr are socketpairs, and apache's
``ErrorLog /dev/stderr`` (agent/roles/router/render.py) fails to open them with ENXIO, so
the router role cannot start apache (reported to the router part; see
test_router_agent.py::test_production_entry_point_applies_first_config)."""

import sys

sys.modules["uvloop"] = None  # type: ignore[assignment]  # `import uvloop` -> ImportError

from agent.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
