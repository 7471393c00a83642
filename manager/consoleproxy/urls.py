"""The console URL a browser is given. Pure.

``consoleproxy.url.domain``:
- empty: the proxy's public IP (``http://1.2.3.4/...``; ``https`` when
  ``consoleproxy.sslEnabled``);
- ``*.example.com``: the IP with dots as dashes under that domain
  (``1-2-3-4.example.com``), for a wildcard certificate;
- a plain FQDN (``console.example.com``): that name (a load balancer in front of proxies).
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlencode

_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


class UrlDomainError(ValueError):
    pass


def _check_fqdn(name: str) -> None:
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise UrlDomainError(f"not a valid domain name: {name!r}")


def proxy_host(public_ip: str, url_domain: str) -> str:
    """Host name (or IP) the browser uses to reach the proxy with ``public_ip``."""
    ip = ipaddress.ip_address(public_ip)
    domain = url_domain.strip().rstrip(".")
    if not domain:
        return f"[{ip}]" if ip.version == 6 else str(ip)
    if domain.startswith("*."):
        rest = domain[2:]
        _check_fqdn(rest)
        label = str(ip).replace(".", "-").replace(":", "-")
        return f"{label}.{rest}"
    if "*" in domain:
        raise UrlDomainError(f"wildcard only as the first label: {url_domain!r}")
    _check_fqdn(domain)
    return domain


def console_url(
    *,
    public_ip: str,
    url_domain: str,
    ssl: bool,
    vm_id: str,
    token: str,
    port: int | None = None,
) -> str:
    """The page URL: ``<scheme>://<host>[:port]/console?vm=<id>&token=<token>``."""
    scheme = "https" if ssl else "http"
    host = proxy_host(public_ip, url_domain)
    default = 443 if ssl else 80
    netloc = host if port in (None, default) else f"{host}:{port}"
    return f"{scheme}://{netloc}/console?{urlencode({'vm': vm_id, 'token': token})}"
