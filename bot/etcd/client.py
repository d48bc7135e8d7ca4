"""The async etcd layer: etcd's v3 gRPC API through aetcd's stubs and grpc.aio.

aetcd's high-level client speaks plaintext to one endpoint and knows neither
learners nor TLS, which the etcd behind Kubernetes needs; so we use its
generated protobuf stubs over our own channels: one per endpoint, TLS with a
client certificate when configured, a deadline on every call, fail-over
across endpoints, and gRPC errors mapped to exceptions carrying etcd's own
message.
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar, cast

# gRPC's C core prints every failed TLS handshake to stderr; our errors say it once.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc
from aetcd import rpc

from bot.etcd.model import (
    AUTH_MESSAGES,
    EtcdAuthError,
    EtcdError,
    EtcdRequestError,
    EtcdTimeout,
    EtcdTLSError,
    EtcdUnavailable,
    Member,
    MemberStatus,
    TLSFiles,
    request_error,
    split_alarms,
)
from bot.etcd.race import AllFailed, first_success
from bot.etcd.urls import Endpoint, parse_url

log = logging.getLogger(__name__)
T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...] | None  # the auth token, when the cluster has auth on

# Snapshots of production databases take minutes; only silence is an error.
SNAPSHOT_IDLE_TIMEOUT = 30.0


def _transport_reason(details: str) -> tuple[type[EtcdUnavailable], str]:
    """Turn gRPC's connection diagnostics into a short reason a human can act on."""
    low = details.lower()
    if "handshake" in low or "ssl" in low or "certificate" in low or "tsi_" in low:
        # TLS 1.3 servers (etcd 3.4's Go) refuse a missing client certificate after the
        # handshake, which gRPC reports as a failed unwrap of the first record.
        if ("certificate_required" in low or "certificate required" in low or "handshake_failure" in low
                or "alert" in low or "tsi_data_corrupted" in low or "unwrap failed" in low):
            return EtcdTLSError, ("TLS handshake failed: the server wants a client certificate we did not present "
                                  "or did not accept (set cert and key)")
        if "certificate verify failed" in low or "verify" in low:
            return EtcdTLSError, "TLS handshake failed: the server's certificate is not trusted (set cacert)"
        return EtcdTLSError, f"TLS handshake failed ({details.strip()[:200]})"
    if "connection refused" in low:
        return EtcdUnavailable, "connection refused (member down?)"
    if "socket closed" in low or "connection reset" in low or "end of tcp stream" in low or "recvmsg" in low:
        return EtcdUnavailable, ("connection closed by the member (it went away, or a plaintext client reached "
                                 "a TLS port)")
    if "no route to host" in low or "network is unreachable" in low:
        return EtcdUnavailable, "no route to host"
    if "dns" in low or "name resolution" in low or "resolve" in low:
        return EtcdUnavailable, "host name does not resolve"
    return EtcdUnavailable, details.strip()[:300] or "unavailable"


def map_grpc_error(error: grpc.aio.AioRpcError, endpoint: str, timeout: float | None = None) -> EtcdError:
    """Map a gRPC error to our exception types, keeping etcd's message."""
    code = error.code()
    details = error.details() or code.name.lower()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        after = f" within {timeout:g}s" if timeout else ""
        return EtcdTimeout(f"no answer{after} (member down or host unreachable)", endpoint)
    if code == grpc.StatusCode.UNAVAILABLE:
        if details.startswith("etcdserver:"):
            return request_error(details, endpoint)
        cls, reason = _transport_reason(details)
        return cls(reason, endpoint)
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED) or any(
            m in details.lower() for m in AUTH_MESSAGES):
        return EtcdAuthError(details, endpoint)
    if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE):
        return request_error(details, endpoint)
    if code == grpc.StatusCode.UNKNOWN and "handshake" in details.lower():
        cls, reason = _transport_reason(details)
        return cls(reason, endpoint)
    return EtcdError(details, endpoint)



def _member(m: Any) -> Member:
    return Member(id=m.ID, name=m.name, peer_urls=tuple(m.peerURLs), client_urls=tuple(m.clientURLs),
                  is_learner=bool(m.isLearner))


# ---------------------------------------------------------------- client

class EtcdClient:
    """A cluster client: fail-over across `endpoints`, deadline on every call.

    Channels are cached per endpoint and dropped after a transport failure,
    so a member that comes back is reached on the next call rather than
    after gRPC's reconnect back-off.
    """

    def __init__(self, endpoints: Iterable[str], *, tls: TLSFiles | None = None, username: str | None = None,
                 password: str | None = None, timeout: float = 2.0):
        self.endpoints = [parse_url(e).url for e in endpoints]
        if not self.endpoints:
            raise ValueError("at least one endpoint is needed")
        self.tls = tls or TLSFiles()
        self.timeout = timeout
        self._username = username
        self._password = password
        self._credentials: grpc.ChannelCredentials | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._tokens: dict[str, str] = {}
        self._preferred: str | None = None
        self.on_error: Callable[[EtcdError], None] | None = None  # metrics hook

    def __repr__(self) -> str:
        return f"EtcdClient({self.endpoints!r})"

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()

    # -- channels -------------------------------------------------------

    def _creds(self) -> grpc.ChannelCredentials:
        if self._credentials is None:
            def read(p: Path | None) -> bytes | None:
                return Path(p).read_bytes() if p else None
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=read(self.tls.cacert), private_key=read(self.tls.key),
                certificate_chain=read(self.tls.cert))
        return self._credentials

    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        channel = self._channels.get(endpoint)
        if channel is None:
            ep: Endpoint = parse_url(endpoint)
            # A local subchannel pool: gRPC otherwise shares connections between channels, and a
            # new channel would inherit the old one's reconnect back-off after a failure.
            options = [("grpc.enable_http_proxy", 0), ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                       ("grpc.use_local_subchannel_pool", 1),
                       ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)]
            if ep.tls:
                channel = grpc.aio.secure_channel(ep.target, self._creds(), options=options)
            else:
                channel = grpc.aio.insecure_channel(ep.target, options=options)
            self._channels[endpoint] = channel
        return channel

    def _drop(self, endpoint: str) -> None:
        channel = self._channels.pop(endpoint, None)
        self._tokens.pop(endpoint, None)
        if channel is not None:
            asyncio.ensure_future(channel.close())

    async def _metadata(self, endpoint: str, timeout: float) -> tuple[tuple[str, str], ...] | None:
        """Authenticate once per endpoint: simple tokens are member-local."""
        if self._username is None:
            return None
        token = self._tokens.get(endpoint)
        if token is None:
            stub = rpc.AuthStub(self._channel(endpoint))
            resp = await stub.Authenticate(rpc.AuthenticateRequest(name=self._username, password=self._password or ""),
                                           timeout=timeout)
            token = self._tokens[endpoint] = resp.token
        return (("token", token),)

    async def call(self, endpoint: str, fn: Callable[[grpc.aio.Channel, Metadata, float], Awaitable[T]],
                   timeout: float | None = None) -> T:
        """Run one RPC against one endpoint with a deadline; map errors."""
        timeout = timeout or self.timeout
        for attempt in (1, 2):
            try:
                return await asyncio.wait_for(self._call_once(endpoint, fn, timeout), timeout + 0.5)
            except TimeoutError:
                self._drop(endpoint)
                err: EtcdError = EtcdTimeout(f"no answer within {timeout:g}s (member down or host unreachable)",
                                             endpoint)
                self._count(err)
                raise err from None
            except grpc.aio.AioRpcError as e:
                err = map_grpc_error(e, endpoint, timeout)
                if isinstance(err, EtcdAuthError) and "invalid auth token" in err.message and attempt == 1:
                    self._tokens.pop(endpoint, None)  # token expired: authenticate again, once
                    continue
                if isinstance(err, EtcdUnavailable):
                    self._drop(endpoint)
                self._count(err)
                raise err from None
        raise AssertionError("unreachable")

    def _count(self, err: EtcdError) -> None:
        if self.on_error is not None:
            self.on_error(err)

    async def _call_once(self, endpoint: str, fn: Callable[[grpc.aio.Channel, Metadata, float], Awaitable[T]],
                         timeout: float) -> T:
        metadata = await self._metadata(endpoint, timeout)
        return await fn(self._channel(endpoint), metadata, timeout)

    def _order(self) -> list[str]:
        if self._preferred in self.endpoints:
            return [self._preferred] + [e for e in self.endpoints if e != self._preferred]
        return list(self.endpoints)

    async def first(self, fn: Callable[[grpc.aio.Channel, Metadata, float], Awaitable[T]],
                    timeout: float | None = None) -> T:
        """A read from whichever endpoint answers first: all are asked at once,
        so a black-holed endpoint costs nothing when another one answers."""
        endpoints = self._order()
        try:
            winner, result = await first_success(
                [self.call(e, fn, timeout) for e in endpoints],
                # etcd itself answered (or a bug): another endpoint would say the same
                fatal=lambda e: isinstance(e, EtcdRequestError | EtcdAuthError) or not isinstance(e, EtcdError))
        except AllFailed as e:
            raise _all_failed(cast(list[EtcdError], e.errors)) from None  # `fatal` raised any other error
        self._preferred = endpoints[winner]
        return result

    async def failover(self, fn: Callable[[grpc.aio.Channel, Metadata, float], Awaitable[T]],
                       timeout: float | None = None) -> T:
        """A change, sent to one endpoint at a time.

        Moves on only when the endpoint could not have received the request
        (connection refused, TLS); a timeout is raised, since the change may
        have been applied, and the caller re-reads before trying again.
        """
        errors: list[EtcdError] = []
        for endpoint in self._order():
            try:
                result = await self.call(endpoint, fn, timeout)
            except EtcdTimeout:
                raise
            except EtcdUnavailable as e:
                errors.append(e)
                continue
            self._preferred = endpoint
            return result
        raise _all_failed(errors)

    # -- cluster API ----------------------------------------------------

    async def member_list(self, timeout: float | None = None) -> list[Member]:
        async def fn(ch: grpc.aio.Channel, md: Metadata, t: float) -> list[Member]:
            resp = await rpc.ClusterStub(ch).MemberList(rpc.MemberListRequest(linearizable=False), timeout=t,
                                                        metadata=md)
            return [_member(m) for m in resp.members]
        return await self.first(fn, timeout)

    async def status(self, endpoint: str, timeout: float | None = None) -> MemberStatus:
        async def fn(ch: grpc.aio.Channel, md: Metadata, t: float) -> MemberStatus:
            r = await rpc.MaintenanceStub(ch).Status(rpc.StatusRequest(), timeout=t, metadata=md)
            errors, alarms = split_alarms(r.errors)
            return MemberStatus(endpoint=endpoint, member_id=r.header.member_id, version=r.version, db_size=r.dbSize,
                                db_size_in_use=r.dbSizeInUse, leader=r.leader, raft_term=r.raftTerm,
                                raft_index=r.raftIndex, raft_applied_index=r.raftAppliedIndex,
                                is_learner=r.isLearner, errors=errors, alarms=alarms)
        return await self.call(parse_url(endpoint).url, fn, timeout)

    async def member_add(self, peer_urls: list[str], *, learner: bool,
                         timeout: float | None = None) -> tuple[Member, list[Member]]:
        async def fn(ch: grpc.aio.Channel, md: Metadata, t: float) -> tuple[Member, list[Member]]:
            r = await rpc.ClusterStub(ch).MemberAdd(rpc.MemberAddRequest(peerURLs=peer_urls, isLearner=learner),
                                                     timeout=t, metadata=md)
            return _member(r.member), [_member(m) for m in r.members]
        return await self.failover(fn, timeout)

    async def member_remove(self, member_id: int, timeout: float | None = None) -> list[Member]:
        async def fn(ch: grpc.aio.Channel, md: Metadata, t: float) -> list[Member]:
            r = await rpc.ClusterStub(ch).MemberRemove(rpc.MemberRemoveRequest(ID=member_id), timeout=t, metadata=md)
            return [_member(m) for m in r.members]
        return await self.failover(fn, timeout)

    async def member_promote(self, member_id: int, timeout: float | None = None) -> list[Member]:
        async def fn(ch: grpc.aio.Channel, md: Metadata, t: float) -> list[Member]:
            r = await rpc.ClusterStub(ch).MemberPromote(rpc.MemberPromoteRequest(ID=member_id), timeout=t, metadata=md)
            return [_member(m) for m in r.members]
        return await self.failover(fn, timeout)

    async def put(self, key: bytes, value: bytes, timeout: float | None = None) -> int:
        """Write one key (used to seed demo clusters); returns the new revision."""
        async def fn(ch: grpc.aio.Channel, md: Metadata, t: float) -> int:
            r = await rpc.KVStub(ch).Put(rpc.PutRequest(key=key, value=value), timeout=t, metadata=md)
            return int(r.header.revision)
        return await self.failover(fn, timeout)

    async def revision(self, endpoint: str, timeout: float | None = None) -> int:
        """The member's current store revision (a serializable, keys-only read of one key)."""
        async def fn(ch: grpc.aio.Channel, md: Metadata, t: float) -> int:
            r = await rpc.KVStub(ch).Range(rpc.RangeRequest(key=b"\0", range_end=b"\0", keys_only=True, limit=1,
                                                            serializable=True), timeout=t, metadata=md)
            return int(r.header.revision)
        return await self.call(parse_url(endpoint).url, fn, timeout)

    async def snapshot(self, endpoint: str, idle_timeout: float = SNAPSHOT_IDLE_TIMEOUT) -> SnapshotStream:
        """Open Maintenance.Snapshot on one member; read it with `async for`."""
        endpoint = parse_url(endpoint).url
        try:
            metadata = await asyncio.wait_for(self._metadata(endpoint, self.timeout), self.timeout + 0.5)
        except TimeoutError:
            self._drop(endpoint)
            raise EtcdTimeout(f"no answer within {self.timeout:g}s", endpoint) from None
        except grpc.aio.AioRpcError as e:
            raise map_grpc_error(e, endpoint, self.timeout) from None
        call = rpc.MaintenanceStub(self._channel(endpoint)).Snapshot(rpc.SnapshotRequest(), metadata=metadata)
        stream = SnapshotStream(self, endpoint, call, idle_timeout)
        await stream.start(self.timeout)
        return stream


class SnapshotStream:
    """The bbolt file then its 32-byte sha256 trailer, chunk by chunk: never
    the whole in memory. `revision` and `size_hint` come with the first chunk."""

    def __init__(self, client: EtcdClient, endpoint: str, call: Any, idle_timeout: float):
        self.client, self.endpoint, self._call, self.idle_timeout = client, endpoint, call, idle_timeout
        self.revision = 0
        self.size_hint = 0
        self._first: bytes | None = None

    async def _read(self, timeout: float) -> Any:
        try:
            resp = await asyncio.wait_for(self._call.read(), timeout)
        except TimeoutError:
            self.client._drop(self.endpoint)
            raise EtcdTimeout(f"snapshot stream silent for {timeout:g}s", self.endpoint) from None
        except grpc.aio.AioRpcError as e:
            err = map_grpc_error(e, self.endpoint, timeout)
            if isinstance(err, EtcdUnavailable):
                self.client._drop(self.endpoint)
            raise err from None
        return None if resp is grpc.aio.EOF else resp

    async def start(self, timeout: float) -> None:
        resp = await self._read(timeout)
        if resp is None:
            raise EtcdError("snapshot stream ended before any data", self.endpoint)
        self.revision = resp.header.revision
        self.size_hint = len(resp.blob) + resp.remaining_bytes
        self._first = resp.blob

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            if self._first:
                first, self._first = self._first, None
                yield first
            while (resp := await self._read(self.idle_timeout)) is not None:
                if resp.blob:
                    yield resp.blob
        finally:
            self.close()

    def close(self) -> None:
        self._call.cancel()


def _all_failed(errors: list[EtcdError]) -> EtcdUnavailable:
    by_reason: dict[str, list[str]] = {}
    for e in errors:
        by_reason.setdefault(e.message, []).append(e.endpoint or "?")
    reasons = "; ".join(f"{', '.join(sorted(eps))}: {msg}" for msg, eps in by_reason.items()) or "no endpoints"
    cls = EtcdTLSError if errors and all(isinstance(e, EtcdTLSError) for e in errors) else EtcdUnavailable
    return cls(f"no endpoint answered: {reasons}")


def client_for(cluster: Any) -> EtcdClient:
    """An EtcdClient for a configured cluster (bot.config.ClusterConfig)."""
    return EtcdClient(cluster.endpoints, tls=TLSFiles(cluster.cacert, cluster.cert, cluster.key),
                      username=cluster.username, password=cluster.password, timeout=cluster.timeout_seconds)
