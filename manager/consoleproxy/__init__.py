"""Console proxy logic on the manager side: pure planners and console tokens.

- :mod:`manager.consoleproxy.tokens` — one-time console tokens (mint, store hashed, consume
  at the websocket upgrade, re-check the VM's record) and the ``console.authorize`` request
  a console proxy VM sends for each browser connection.
- :mod:`manager.consoleproxy.assign` — which proxy a VM's console goes to (sticky, then
  least loaded).
- :mod:`manager.consoleproxy.scale` — how many proxies a zone needs (standby rule), which
  idle ones to stop, and drain-before-restart.
- :mod:`manager.consoleproxy.urls` — the console URL a browser is given.
- :mod:`manager.consoleproxy.load` — parsing the ``console.sessions`` events proxies send.
"""
