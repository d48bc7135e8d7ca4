"""The `database` setting: a path (SQLite) or a postgresql:// URL, and how a URL
is shown: never with its password. Pure (the config validates with it)."""
from __future__ import annotations

from urllib.parse import SplitResult, parse_qsl, urlsplit

SCHEMES = ("postgresql", "postgres")
# libpq's URI parameters a URL may carry (https://www.postgresql.org/docs/15/libpq-connect.html#LIBPQ-PARAMKEYWORDS).
PARAMETERS = frozenset({
    "host", "hostaddr", "port", "dbname", "user", "passfile", "channel_binding", "connect_timeout",
    "client_encoding", "options", "application_name", "fallback_application_name", "keepalives",
    "keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout", "sslmode", "requiressl",
    "sslcompression", "sslcert", "sslkey", "sslpassword", "sslrootcert", "sslcrl", "sslcrldir", "sslsni",
    "requirepeer", "ssl_min_protocol_version", "ssl_max_protocol_version", "gssencmode", "krbsrvname",
    "gsslib", "service", "target_session_attrs", "load_balance_hosts"})
SECRET_PARAMETERS = ("password", "sslpassword")


def secrets_of(url: str) -> list[str]:
    """The passwords a URL carries (in its user part or as parameters)."""
    parts = urlsplit(url)
    found = [parts.password] if parts.password else []
    return found + [v for k, v in parse_qsl(parts.query) if k in SECRET_PARAMETERS and v]


def redact(url: str) -> str:
    """The URL as it may be shown: user, host, port and database, never a password or the parameters."""
    try:
        parts = urlsplit(url)
        user = f"{parts.username}@" if parts.username else ""
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return f"{url.split('://', 1)[0]}://(unparsable URL)"
    return f"{parts.scheme}://{user}{host}{port}{parts.path}"


def check_url(url: str) -> str:
    """The URL when it is one libpq takes and we can show; ValueError with one line (no password) otherwise."""
    parts: SplitResult = urlsplit(url)
    shown = redact(url)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"{shown}: not a postgresql:// URL")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError(f"{shown}: the port is not a number from 1 to 65535")
    if parts.fragment:
        raise ValueError(f"{shown}: a database URL has no #fragment")
    if parts.path.count("/") > 1:
        raise ValueError(f"{shown}: the database name is one path segment (postgresql://user@host:5432/dbname)")
    for key, _ in parse_qsl(parts.query, keep_blank_values=True):
        if key not in PARAMETERS and key not in SECRET_PARAMETERS:
            raise ValueError(f"{shown}: unknown connection parameter {key!r}")
    return url
