"""The URLs etcd members are known by: parsed, never trusted.

etcd accepts only `scheme://host:port` for client and peer URLs; catching a
typo here gives a one-line reason instead of an opaque gRPC error later.

Two entry points, for two sources. `parse_url` is for what a person gives the
bot (the config, a command): it raises ValueError with the reason. `read_url`
is for what etcd hands back (member lists): it is total, because etcd accepts
more than the bot can dial (`member add --peer-urls=http://127.0.0.1:238000`
is stored as is), and one such member must not break a status, a plan or the
watch. It returns the Endpoint or an Unusable that says why, shown as such.
"""
from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from bot.domain.errors import EtcdUnusableURL

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
        return f"{self.scheme}://{self.target}"

    @property
    def target(self) -> str:
        """The `host:port` form gRPC dials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def address(self) -> str:
        """Host and port, whatever the scheme: two URLs with the same address bind (or reach) the same port."""
        try:
            host = ipaddress.ip_address(self.host).compressed
        except ValueError:
            host = self.host.lower()
        return Endpoint(self.scheme, host, self.port).target

    @property
    def tls(self) -> bool:
        return self.scheme == "https"


@dataclass(frozen=True)
class Unusable:
    """A URL the bot cannot use, and why (etcd stores URLs the bot cannot dial)."""

    text: str
    reason: str

    def __str__(self) -> str:
        return f"unusable URL {self.text!r} ({self.reason})"


def read_url(text: str) -> Endpoint | Unusable:
    """`http(s)://host:port` as an Endpoint, anything else as an Unusable: never raises."""
    if not isinstance(text, str) or not text:
        return Unusable(str(text), "empty")
    try:
        parts = urlsplit(text)
        port = parts.port
        host = parts.hostname or ""
    except ValueError as e:   # urllib's words: "Port out of range 0-65535", "Invalid IPv6 URL"
        why = str(e).lower()
        return Unusable(text, "port out of range" if "out of range" in why else "bad port" if "port" in why
                        else "does not parse")
    if parts.scheme not in ("http", "https"):
        return Unusable(text, "scheme must be http or https")
    if not host:
        return Unusable(text, "no host")
    if port is None:
        return Unusable(text, "no port")
    if not 0 < port < 65536:
        return Unusable(text, "port out of range")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        return Unusable(text, "no path, query or credentials allowed")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.fullmatch(host):
            return Unusable(text, "bad host name")
    return Endpoint(parts.scheme, host, port)


def parse_url(text: str) -> Endpoint:
    """Parse `http(s)://host:port` or raise ValueError with the reason."""
    found = read_url(text)
    if isinstance(found, Unusable):
        if found.reason == "empty":
            raise ValueError("empty URL; expected http(s)://host:port")
        raise ValueError(f"{text!r} is not an http(s)://host:port URL ({found.reason})")
    return found


def dial(url: str) -> Endpoint:
    """What to dial for a URL a member list handed over, or EtcdUnusableURL (an EtcdError like any other failed
    call, so one such member costs its own answer, not the caller's whole fan-out)."""
    found = read_url(url)
    if isinstance(found, Unusable):
        raise EtcdUnusableURL(str(found))
    return found


def usable_urls(urls: Iterable[str]) -> list[str]:
    """The URLs that parse, normalized (the others cannot be dialled)."""
    return [found.url for found in map(read_url, urls) if isinstance(found, Endpoint)]


def shown_urls(urls: Iterable[str]) -> str:
    """URLs for a person: comma-separated, each one the bot cannot use marked as such; "-" when none."""
    return ", ".join(u if isinstance(read_url(u), Endpoint) else str(read_url(u)) for u in urls) or "-"
