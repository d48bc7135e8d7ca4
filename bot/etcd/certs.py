"""The serving certificates of a cluster's members, as a client sees them in the TLS handshake.

A certificate that expires takes the member (peer URL: out of the raft group;
client URL: kube-apiserver cannot reach it) down at a known time, so the
watch warns days ahead. The certificate is read from the handshake on every
https client and peer URL, not from files: what a member serves is what
counts. Peer URLs usually demand a client certificate (`--peer-client-cert-auth`),
so the cluster's configured one is presented. Verification is off on purpose:
an expired or untrusted certificate must still be read and reported.

No gRPC: plain asyncio TLS, one deadline per URL, all URLs at once.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from bot.domain.cluster import Member, TLSFiles
from bot.domain.errors import EtcdError
from bot.domain.urls import dial

Kind = Literal["client", "peer"]
DAY = 86400.0


@dataclass(frozen=True)
class ServingCert:
    """The facts of one served certificate a person needs to renew it."""

    not_after: float                   # epoch seconds
    subject: str                       # RFC 4514, e.g. CN=etcd-member
    sans: tuple[str, ...] = ()         # DNS names and IP addresses

    def seconds_left(self, now: float) -> float:
        return self.not_after - now

    @property
    def expires(self) -> str:
        return dt.datetime.fromtimestamp(self.not_after, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


@dataclass(frozen=True)
class CertReading:
    """One URL's handshake: the certificate, or why none was read."""

    member: str
    kind: Kind
    url: str
    cert: ServingCert | None = None
    error: str | None = None
    at: float = 0.0                    # time.time() of the reading


def parse_der(der: bytes) -> ServingCert:
    """notAfter, subject and SANs of a DER certificate (ValueError when it is none)."""
    from cryptography import x509
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = tuple(str(n) for n in (*san.get_values_for_type(x509.DNSName),
                                      *san.get_values_for_type(x509.IPAddress)))
    except x509.ExtensionNotFound:
        sans = ()
    return ServingCert(not_after=cert.not_valid_after_utc.timestamp(), subject=cert.subject.rfc4514_string(),
                       sans=sans)


def client_context(tls: TLSFiles) -> ssl.SSLContext:
    """Presents the configured client certificate (peer ports ask for one) and verifies nothing."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if tls.cert and tls.key:
        ctx.load_cert_chain(tls.cert, tls.key)
    return ctx


async def read_cert(url: str, ctx: ssl.SSLContext, timeout: float) -> ServingCert:
    """The certificate `url` serves; OSError or TimeoutError (with a reason) when the handshake fails,
    EtcdError when the URL cannot be dialled."""
    ep = dial(url)

    async def handshake() -> bytes | None:
        _, writer = await asyncio.open_connection(ep.host, ep.port, ssl=ctx, ssl_handshake_timeout=timeout)
        try:
            sslobj = writer.get_extra_info("ssl_object")
            return sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        finally:
            writer.close()

    try:
        der = await asyncio.wait_for(handshake(), timeout)
    except TimeoutError:
        raise TimeoutError(f"no TLS handshake within {timeout:g}s") from None
    if not der:
        raise OSError("the server presented no certificate")
    try:
        return parse_der(der)
    except ValueError as e:
        raise OSError(f"unreadable certificate: {e}") from None


def tls_urls(members: Iterable[Member]) -> list[tuple[str, Kind, str]]:
    """(member name, kind, URL) for every https client and peer URL of `members`."""
    out: list[tuple[str, Kind, str]] = []
    for m in members:
        name = m.name or m.hex_id
        out += [(name, "client", u) for u in m.client_urls if u.startswith("https://")]
        out += [(name, "peer", u) for u in m.peer_urls if u.startswith("https://")]
    return out


async def read_certs(targets: Iterable[tuple[str, Kind, str]], tls: TLSFiles, timeout: float,
                     now: float) -> list[CertReading]:
    """Every target's certificate at once, each under `timeout`: a silent member costs one deadline."""
    targets = list(targets)
    if not targets:
        return []
    ctx = client_context(tls)

    async def one(member: str, kind: Kind, url: str) -> CertReading:
        try:
            return CertReading(member, kind, url, cert=await read_cert(url, ctx, timeout), at=now)
        except ssl.SSLError as e:
            return CertReading(member, kind, url, error=_tls_reason(e), at=now)
        except (OSError, TimeoutError, ValueError) as e:
            return CertReading(member, kind, url, error=str(e) or type(e).__name__, at=now)
        except EtcdError as e:
            return CertReading(member, kind, url, error=e.message, at=now)

    return list(await asyncio.gather(*(one(*t) for t in targets)))


def _tls_reason(e: ssl.SSLError) -> str:
    if "BAD_CERTIFICATE" in str(e) or "CERTIFICATE_REQUIRED" in str(e) or "UNKNOWN_CA" in str(e):
        return ("TLS handshake failed: the member wants a client certificate we did not present or it did not "
                "accept (set cert and key)")
    return f"TLS handshake failed ({e.reason or e})"


# ---------------------------------------------------------------- pure

def expiring(readings: Iterable[CertReading], now: float, warn_seconds: float) -> list[CertReading]:
    """The readings whose certificate expires within `warn_seconds` (expired ones included), soonest first."""
    found = [r for r in readings if r.cert is not None and r.cert.seconds_left(now) <= warn_seconds]
    return sorted(found, key=lambda r: (r.cert.not_after if r.cert else 0.0, r.member, r.kind))


def remaining(cert: ServingCert, now: float) -> str:
    """"in 3 days", "in 5 hours", "2 days ago": how a person reads the margin."""
    left = cert.seconds_left(now)
    return f"{_span(-left)} ago" if left < 0 else f"in {_span(left)}"


def _span(seconds: float) -> str:
    """Rounded to what matters: days from two days on, hours below."""
    if seconds >= 2 * DAY - 1800:
        return f"{round(seconds / DAY)} days"
    n = round(seconds / 3600)
    return f"{n} hour{'s' if n != 1 else ''}" if n else "less than an hour"
