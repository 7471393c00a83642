#!/usr/bin/python3
# ruff: noqa: SIM112  (udhcpc passes lower-case variables)
"""busybox udhcpc event hook: configures the lease (argv lists, no shell) and records it."""

import os
import subprocess
import sys

event = sys.argv[1] if len(sys.argv) > 1 else ""
iface = os.environ.get("interface", "eth0")
if event == "deconfig":
    subprocess.run(["ip", "addr", "flush", "dev", iface], check=True, timeout=10)
elif event in ("bound", "renew"):
    ip, mask = os.environ["ip"], os.environ.get("mask", "24")
    subprocess.run(["ip", "addr", "flush", "dev", iface], check=True, timeout=10)
    subprocess.run(["ip", "addr", "add", f"{ip}/{mask}", "dev", iface], check=True, timeout=10)
    router = os.environ.get("router", "").split()
    if router:
        subprocess.run(
            ["ip", "route", "replace", "default", "via", router[0]], check=True, timeout=10
        )
    with open(os.environ["LEASE_OUT"], "w") as f:
        for k in ("ip", "mask", "router", "dns", "domain", "hostname", "lease"):
            f.write(f"{k}={os.environ.get(k, '')}\n")
