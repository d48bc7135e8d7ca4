"""Validation of the URLs etcd members are known by.

etcd accepts only `scheme://host:port` for client and peer URLs; catching a
typo here gives a one-line reason instead of an opaque gRPC error later.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


@dataclass(frozen=True)
class Endpoint:
    """A parsed `http(s)://host:port` URL."""

    scheme: str
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def target(self) -> str:
        """The `host:port` form gRPC dials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def tls(self) -> bool:
        return self.scheme == "https"


def parse_url(text: str) -> Endpoint:
    """Parse `http(s)://host:port` or raise ValueError with the reason."""
    if not isinstance(text, str) or not text:
        raise ValueError("empty URL; expected http(s)://host:port")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError(f"{text!r} is not an http(s)://host:port URL (bad port)") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{text!r} is not an http(s)://host:port URL (scheme must be http or https)")
    host = parts.hostname or ""
    if not host:
        raise ValueError(f"{text!r} is not an http(s)://host:port URL (no host)")
    if port is None:
        raise ValueError(f"{text!r} is not an http(s)://host:port URL (no port)")
    if not 0 < port < 65536:
        raise ValueError(f"{text!r} is not an http(s)://host:port URL (port out of range)")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{text!r} is not an http(s)://host:port URL (no path, query or credentials allowed)")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(f"{text!r} is not an http(s)://host:port URL (bad host name)") from None
    return Endpoint(parts.scheme, host, port)
