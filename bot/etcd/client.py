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
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from bot.domain.errors import (
    LearnerNotReady,
    MemberNotFound,
    NotALearner,
    PeerURLExists,
    TooManyLearners,
    UnhealthyCluster,
)

# gRPC's C core prints every failed TLS handshake to stderr; our errors say it once.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc
from aetcd import rpc
from google.protobuf.unknown_fields import UnknownFieldSet

from bot.domain.cluster import NOT_SERVING, SERVING, KVHash, Member, MemberStatus, TLSFiles, split_alarms
from bot.domain.errors import (
    CLOSED_UNDER_CALL,
    EtcdAuthError,
    EtcdError,
    EtcdRequestError,
    EtcdTimeout,
    EtcdTLSError,
    EtcdUnavailable,
    LearnerUnsupported,
)
from bot.domain.urls import Endpoint, dial, parse_url, usable_urls
from bot.etcd.race import AllFailed, first_success

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long a learned endpoint's answer waits for a configured endpoint's (which is preferred).
LEARNED_GRACE = 0.25
# Snapshots of production databases take minutes; only silence is an error.
SNAPSHOT_IDLE_TIMEOUT = 30.0
# A defragmentation rewrites the whole database file; a 2 GiB one takes minutes on a slow disk.
DEFRAG_TIMEOUT = 600.0


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



# Fields newer etcd releases send that aetcd's stubs (generated from etcd 3.5's protos) do not know: protobuf
# keeps them as unknown fields, read by number. etcd 3.6's StatusResponse and HashKVResponse:
STATUS_STORAGE_VERSION, STATUS_DB_SIZE_QUOTA, STATUS_DOWNGRADE_INFO = 11, 12, 13
HASHKV_HASH_REVISION = 4
# gRPC's standard health service, which etcd serves (its messages decoded by number as the others)
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_STATES = {0: "UNKNOWN", 1: SERVING, 2: NOT_SERVING, 3: "SERVICE_UNKNOWN"}


def newer_fields(message: Any) -> dict[int, int | bytes]:
    """A message's unknown fields by number: a varint's value, a length-delimited field's bytes."""
    return {f.field_number: f.data for f in UnknownFieldSet(message) if isinstance(f.data, int | bytes)}


def _parsed(data: int | bytes) -> Any:
    """An embedded message known only by its bytes, as a message whose every field is unknown."""
    empty = rpc.StatusRequest()  # a message with no fields of its own
    empty.ParseFromString(data if isinstance(data, bytes) else b"")
    return empty


def _text(data: int | bytes | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else ""


def _signed(data: int | bytes | None) -> int:
    """An int64 sent as a varint (two's complement in 64 bits)."""
    if not isinstance(data, int):
        return 0
    return data - (1 << 64) if data >= 1 << 63 else data


def _member(m: Any) -> Member:
    return Member(id=m.ID, name=m.name, peer_urls=tuple(m.peerURLs), client_urls=tuple(m.clientURLs),
                  is_learner=bool(m.isLearner))


# ---------------------------------------------------------------- client

Metadata = tuple[tuple[str, str], ...] | None  # the auth token, when one is sent
Call = Callable[[grpc.aio.Channel, Metadata, float], Awaitable[T]]
Auth = Literal["required", "optional", "none"]  # whether a call carries a token (see EtcdClient._metadata)
Lane = Literal["short", "long"]  # the channel a call goes on (see EtcdClient._channel)


class EtcdClient:
    """A cluster client: fail-over across `endpoints`, deadline on every call.

    Channels are cached per endpoint and dropped after a transport failure,
    so a member that comes back is reached on the next call rather than
    after gRPC's reconnect back-off.

    After replacements the configured endpoints go stale; so the client
    remembers the client URLs of the voting members in the last member list
    it read (`learned`) and falls back to them when no configured endpoint
    answers.
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
        self._channels: dict[tuple[str, Lane], grpc.aio.Channel] = {}
        # Why a channel was dropped: a call it was closed under fails for that reason (a silent member), not for
        # "the connection was closed"
        self._dropped_for: weakref.WeakKeyDictionary[grpc.aio.Channel, EtcdError] = weakref.WeakKeyDictionary()
        self._token: str | None = None  # one for every member (see _metadata)
        self._login_task: asyncio.Future[str] | None = None
        self._login_error = ""           # why the last Authenticate gave no token
        self._preferred: str | None = None
        self.learned: list[str] = []  # voters' client URLs from the last member list, not configured
        self.on_error: Callable[[EtcdError], None] | None = None  # metrics hook

    def __repr__(self) -> str:
        return f"EtcdClient({self.endpoints!r})"

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._login_task is not None and not self._login_task.done():
            self._login_task.cancel()
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

    def _channel(self, endpoint: str, lane: Lane = "short") -> grpc.aio.Channel:
        """The endpoint's channel for short calls, or for long ones (a defragmentation, a snapshot stream): those
        run for minutes on a channel of their own, which no short call's deadline closes under them."""
        channel = self._channels.get((endpoint, lane))
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
            self._channels[(endpoint, lane)] = channel
        return channel

    def _drop(self, endpoint: str, lane: Lane, why: EtcdError) -> None:
        channel = self._channels.pop((endpoint, lane), None)
        if channel is not None:
            self._dropped_for[channel] = why
            asyncio.ensure_future(channel.close())

    def learn(self, members: Iterable[Member]) -> None:
        """Remember the voters' client URLs to fall back to (learners answer no member list)."""
        urls: list[str] = []
        for m in members:
            if m.started and not m.is_learner:
                urls += [u for u in usable_urls(m.client_urls) if u not in self.endpoints and u not in urls]
        self.learned = urls

    async def _metadata(self, endpoint: str, timeout: float, auth: Auth = "required") -> Metadata:
        """The token a call carries when the cluster has a user configured.

        One token serves every member, learners included: etcd applies Authenticate through raft on
        every member (each assigns the same simple token; a JWT is signed with the cluster's key), but
        a learner refuses Authenticate itself. So the token is obtained once, from whichever member
        answers first (`_login`), and kept: Authenticate needs a leader, and after a quorum loss the
        token obtained before still reads Status and the member list. With `auth="optional"` (the
        reads etcd 3.5.1 serves without a token) an Authenticate that finds no leader within half the
        deadline leaves the call to go without one; later releases refuse that with "user name is
        empty", and the error then says why the bot held no token. `auth="none"`: gRPC's health check.
        """
        if self._username is None or auth == "none":
            return None
        token = self._token or await self._login(endpoint, timeout, optional=auth == "optional")
        return (("token", token),) if token else None

    async def _login(self, endpoint: str, timeout: float, *, optional: bool) -> str | None:
        """The token, from one Authenticate shared by every call waiting for it (the health fan-out asks
        all members at once), raced over `endpoint` and every other member the client knows."""
        if self._login_task is None or self._login_task.done():
            candidates = list(dict.fromkeys([endpoint, *self._order()]))
            self._login_task = asyncio.ensure_future(self._authenticate(candidates, timeout))
            # its outcome is read here when a caller waits for it; one nobody waited for is dropped quietly
            self._login_task.add_done_callback(lambda t: t.cancelled() or t.exception())
        wait = timeout / 2 if optional else timeout
        try:
            return await asyncio.wait_for(asyncio.shield(self._login_task), wait)
        except TimeoutError:
            self._login_error = f"Authenticate found no leader within {wait:g}s"
            if optional:
                return None
            raise EtcdTimeout(f"cannot authenticate: {self._login_error}", endpoint) from None
        except (EtcdUnavailable, LearnerUnsupported) as e:
            self._login_error = f"cannot authenticate: {e.message}"
            if optional:
                return None
            raise

    async def _authenticate(self, endpoints: list[str], timeout: float) -> str:
        """Authenticate at every endpoint at once; the first token wins and is kept. A member in an
        election answers "no leader" or "leader changed": it is asked again until the deadline. Wrong
        credentials fail at once (EtcdAuthError); learners and silent members leave it to the others."""
        request = rpc.AuthenticateRequest(name=self._username or "", password=self._password or "")
        deadline = time.monotonic() + timeout

        async def at(endpoint: str) -> str:
            while True:
                left = deadline - time.monotonic()
                try:
                    resp = await rpc.AuthStub(self._channel(endpoint)).Authenticate(request, timeout=max(left, 0.05))
                    return str(resp.token)
                except grpc.aio.AioRpcError as e:
                    err = map_grpc_error(e, endpoint, timeout)
                    if not any(m in (e.details() or "") for m in _LEADERLESS) or left < 0.2:
                        # A refused or broken connection is dropped, so the next call dials anew. Not a deadline:
                        # Authenticate waits for a leader, and a live member without one would see its other
                        # calls in flight cut with "no answer" (a quorum loss's survivor was shown DOWN).
                        if isinstance(err, EtcdUnavailable) and not isinstance(err, EtcdTimeout):
                            self._drop(endpoint, "short", err)
                        raise err from None
                await asyncio.sleep(0.1)

        try:
            _, token = await first_success([at(e) for e in endpoints],
                                           fatal=lambda e: isinstance(e, EtcdAuthError) or not isinstance(e, EtcdError))
        except AllFailed as e:
            learners = [err for err in e.errors if isinstance(err, LearnerUnsupported)]
            if learners and len(learners) == len(e.errors):
                raise learners[0] from None
            raise _all_failed([err for err in e.errors if not isinstance(err, LearnerUnsupported)]) from None
        self._token = token
        return token

    async def call(self, endpoint: str, fn: Call[T], timeout: float | None = None, *, auth: Auth = "required",
                   lane: Lane = "short") -> T:
        """Run one RPC against one endpoint with a deadline; map errors.
        With a user configured the call carries the cluster's token (`auth`: see _metadata)."""
        timeout = timeout or self.timeout
        endpoint = dial(endpoint).url
        for attempt in (1, 2, 3):
            used: list[grpc.aio.Channel] = []
            try:
                return await asyncio.wait_for(self._call_once(endpoint, fn, timeout, auth, lane, used),
                                              timeout + 0.5)
            except TimeoutError:
                timed_out = EtcdTimeout(f"no answer within {timeout:g}s (member down or host unreachable)", endpoint)
                self._drop(endpoint, lane, timed_out)
                self._count(timed_out)
                raise timed_out from None
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise  # the caller is being cancelled
                # The channel was closed under the call, by another call that failed on it: this one failed for the
                # same reason. Raised on, the CancelledError would end the caller's task as if it were cancelled.
                why = next((self._dropped_for[c] for c in used if c in self._dropped_for), None)
                closed = type(why)(why.message, endpoint) if why else EtcdUnavailable(CLOSED_UNDER_CALL, endpoint)
                self._count(closed)
                raise closed from None
            except grpc.aio.AioRpcError as e:
                err = map_grpc_error(e, endpoint, timeout)
                if isinstance(err, EtcdAuthError) and attempt < 3 and self._token is not None and any(
                        m in err.message for m in EXPIRED_TOKEN):
                    # A member learns a simple token when it applies the Authenticate: one behind does a moment
                    # later. Still unknown then: expired, or a restarted member forgot it; a new token is asked
                    # for, and the old one kept for the members that know it when none can be had (no leader).
                    if attempt == 1:
                        await asyncio.sleep(TOKEN_APPLY_WAIT)
                        continue
                    if await self._login(endpoint, timeout, optional=True) is not None:
                        continue
                    err = EtcdAuthError(f"{err.message} (the member does not know the bot's token, and no new one "
                                        f"can be had: {self._login_error})", endpoint)
                if isinstance(err, EtcdAuthError) and self._username is not None and self._token is None \
                        and "user name is empty" in err.message and self._login_error:
                    err = EtcdAuthError(f"{err.message} (etcd auth is on and the bot holds no token: "
                                        f"{self._login_error})", endpoint)
                if isinstance(err, EtcdUnavailable):
                    self._drop(endpoint, lane, err)
                self._count(err)
                raise err from None
        raise AssertionError("unreachable")

    def _count(self, err: EtcdError) -> None:
        if self.on_error is not None:
            self.on_error(err)

    async def _call_once(self, endpoint: str, fn: Call[T], timeout: float, auth: Auth, lane: Lane,
                         used: list[grpc.aio.Channel]) -> T:
        metadata = await self._metadata(endpoint, timeout, auth)
        used.append(channel := self._channel(endpoint, lane))
        return await fn(channel, metadata, timeout)

    def _fallbacks(self) -> list[str]:
        return [e for e in self.learned if e not in self.endpoints]

    def _order(self) -> list[str]:
        """The configured endpoints then the learned ones, the last to answer first."""
        endpoints = self.endpoints + self._fallbacks()
        if self._preferred in endpoints:
            endpoints = [self._preferred] + [e for e in endpoints if e != self._preferred]
        return endpoints

    async def _race(self, endpoints: list[str], fn: Call[T], timeout: float | None, auth: Auth) -> tuple[str, T]:
        winner, result = await first_success(
            [self.call(e, fn, timeout, auth=auth) for e in endpoints],
            # etcd itself answered (or a bug): another endpoint would say the same; but a
            # learner refuses what a voter answers
            fatal=lambda e: (isinstance(e, EtcdRequestError | EtcdAuthError) and not isinstance(e, LearnerUnsupported))
            or not isinstance(e, EtcdError))
        return endpoints[winner], result

    async def first(self, fn: Call[T], timeout: float | None = None) -> T:
        """A read from whichever endpoint answers first (see `first_from`)."""
        return (await self.first_from(fn, timeout))[1]

    async def first_from(self, fn: Call[T], timeout: float | None = None,
                         auth: Auth = "required") -> tuple[str, T]:
        """A read from whichever endpoint answers first, and that endpoint: all are
        asked at once, so a black-holed endpoint costs nothing when another one
        answers. The learned endpoints are asked at the same time; their answer is
        taken when no configured one answers within a short grace after it (so
        configured endpoints that went silent for good cost no deadline per call)."""
        configured = asyncio.ensure_future(self._race([e for e in self._order() if e in self.endpoints], fn, timeout,
                                                      auth))
        fallbacks = self._fallbacks()
        fallback = asyncio.ensure_future(self._race(fallbacks, fn, timeout, auth)) if fallbacks else None
        try:
            if fallback is not None:
                await asyncio.wait({configured, fallback}, return_when=asyncio.FIRST_COMPLETED)
                if fallback.done() and fallback.exception() is None and not configured.done():
                    await asyncio.wait({configured}, timeout=min(LEARNED_GRACE, (timeout or self.timeout) / 4))
                    if not configured.done() or configured.exception() is not None:
                        endpoint, result = fallback.result()
                        self._preferred = endpoint
                        return endpoint, result
            try:
                endpoint, result = await configured
            except AllFailed as e:
                if fallback is None:
                    raise _all_failed(e.errors) from None
                try:
                    endpoint, result = await fallback
                except AllFailed as e2:
                    raise _all_failed(e.errors + e2.errors) from None
        finally:
            for task in (configured, fallback):
                if task is not None and not task.done():
                    task.cancel()
            await asyncio.gather(*(t for t in (configured, fallback) if t is not None), return_exceptions=True)
        self._preferred = endpoint
        return endpoint, result

    async def failover(self, fn: Call[T], timeout: float | None = None, first: Iterable[str] = ()) -> T:
        """A change, sent to one endpoint at a time (the `first` ones, then ours).

        Moves on only when the endpoint could not have received the request
        (connection refused, TLS); a timeout is raised, since the change may
        have been applied, and the caller re-reads before trying again.
        """
        errors: list[EtcdError] = []
        for endpoint in dict.fromkeys([*first, *self._order()]):
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
        return (await self.member_list_from(timeout))[1]

    async def member_list_from(self, timeout: float | None = None) -> tuple[str, list[Member]]:
        """The member list and the endpoint that gave it; the voters' client URLs are learned."""
        async def fn(ch: grpc.aio.Channel, md: Metadata, t: float) -> list[Member]:
            resp = await rpc.ClusterStub(ch).MemberList(rpc.MemberListRequest(linearizable=False), timeout=t,
                                                        metadata=md)
            return [_member(m) for m in resp.members]
        endpoint, members = await self.first_from(fn, timeout, auth="optional")  # readable without quorum
        self.learn(members)
        return endpoint, members

    async def status(self, endpoint: str, timeout: float | None = None) -> MemberStatus:
        """Maintenance.Status, with the cluster's token when there is one (a learner takes a voter's;
        etcd 3.5.1 answers without one, later releases refuse "user name is empty")."""
        async def fn(ch: grpc.aio.Channel, md: Metadata, t: float) -> MemberStatus:
            r = await rpc.MaintenanceStub(ch).Status(rpc.StatusRequest(), timeout=t, metadata=md)
            errors, alarms = split_alarms(r.errors)
            newer = newer_fields(r)
            downgrade = newer_fields(_parsed(newer.get(STATUS_DOWNGRADE_INFO, b"")))
            return MemberStatus(endpoint=endpoint, member_id=r.header.member_id, version=r.version, db_size=r.dbSize,
                                db_size_in_use=r.dbSizeInUse, leader=r.leader, raft_term=r.raftTerm,
                                raft_index=r.raftIndex, raft_applied_index=r.raftAppliedIndex,
                                is_learner=r.isLearner, errors=errors, alarms=alarms, cluster_id=r.header.cluster_id,
                                storage_version=_text(newer.get(STATUS_STORAGE_VERSION)),
                                db_size_quota=_signed(newer.get(STATUS_DB_SIZE_QUOTA)),
                                downgrade_target=_text(downgrade.get(2)) if downgrade.get(1) else None)
        return await self.call(endpoint, fn, timeout, auth="optional")

    async def serving(self, endpoint: str, timeout: float | None = None) -> str:
        """The member's answer to gRPC's health check (grpc.health.v1, the whole server): SERVING, or NOT_SERVING
        while it defragments with StopGRPCServiceOnDefrag on (its Status then waits for the defragmentation).
        Sent without a token: etcd asks for none there."""
        async def fn(ch: grpc.aio.Channel, md: Metadata, t: float) -> str:
            check = ch.unary_unary(HEALTH_CHECK, request_serializer=None, response_deserializer=None)
            answer = newer_fields(_parsed(await check(b"", timeout=t))).get(1, 0)  # HealthCheckResponse.status
            return HEALTH_STATES.get(answer if isinstance(answer, int) else 0, "UNKNOWN")
        return await self.call(endpoint, fn, timeout, auth="none")

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
        """Sent to the leader: with auth on, a follower forwards a promote to the
        leader without the user, and it fails there ("auth: user name is empty",
        etcd issues 14070 and 20757): the caller would only see a timeout."""
        async def fn(ch: grpc.aio.Channel, md: Metadata, t: float) -> list[Member]:
            r = await rpc.ClusterStub(ch).MemberPromote(rpc.MemberPromoteRequest(ID=member_id), timeout=t, metadata=md)
            return [_member(m) for m in r.members]
        return await self.failover(fn, timeout, first=await self.leader_urls(timeout))

    async def leader_urls(self, timeout: float | None = None) -> list[str]:
        """The leader's client URLs, as the member that gives the member list sees it."""
        endpoint, members = await self.member_list_from(timeout)
        leader = (await self.status(endpoint, timeout)).leader
        return [u for m in members if m.id == leader for u in usable_urls(m.client_urls)]

    async def put(self, key: bytes, value: bytes, timeout: float | None = None) -> int:
        """Write one key (used to seed demo clusters); returns the new revision."""
        async def fn(ch: grpc.aio.Channel, md: Metadata, t: float) -> int:
            r = await rpc.KVStub(ch).Put(rpc.PutRequest(key=key, value=value), timeout=t, metadata=md)
            return int(r.header.revision)
        return await self.failover(fn, timeout)

    async def revision(self, endpoint: str, timeout: float | None = None, *, linearizable: bool = False) -> int:
        """The member's current store revision (a keys-only read of one key). Serializable: what the member
        has applied. `linearizable`: the member first confirms the leader's commit index and answers once it
        has applied that far, so the revision covers every write acknowledged before the call (a voter that
        follows a leader only: without one it waits out the deadline, and a learner refuses)."""
        async def fn(ch: grpc.aio.Channel, md: Metadata, t: float) -> int:
            r = await rpc.KVStub(ch).Range(rpc.RangeRequest(key=b"\0", range_end=b"\0", keys_only=True, limit=1,
                                                            serializable=not linearizable), timeout=t, metadata=md)
            return int(r.header.revision)
        return await self.call(endpoint, fn, timeout)

    async def count_keys(self, endpoint: str, timeout: float | None = None) -> tuple[int, int]:
        """(live keys, revision) of one member: a serializable count-only read of the whole key space."""
        async def fn(ch: grpc.aio.Channel, md: Metadata, t: float) -> tuple[int, int]:
            r = await rpc.KVStub(ch).Range(rpc.RangeRequest(key=b"\0", range_end=b"\0", count_only=True,
                                                            serializable=True), timeout=t, metadata=md)
            return int(r.count), int(r.header.revision)
        return await self.call(endpoint, fn, timeout)

    # -- maintenance (NOSPACE, consistency) ---------------------------------

    async def hash_kv(self, endpoint: str, revision: int, timeout: float | None = None) -> KVHash:
        """Maintenance.HashKV on one member at `revision` (0: its current one)."""
        async def fn(ch: grpc.aio.Channel, md: Metadata, t: float) -> KVHash:
            r = await rpc.MaintenanceStub(ch).HashKV(rpc.HashKVRequest(revision=revision), timeout=t, metadata=md)
            return KVHash(endpoint=endpoint, member_id=r.header.member_id, hash=r.hash,
                          compact_revision=r.compact_revision, revision=r.header.revision,
                          hash_revision=_signed(newer_fields(r).get(HASHKV_HASH_REVISION)))
        return await self.call(endpoint, fn, timeout)

    async def compact(self, revision: int, timeout: float | None = None) -> None:
        """Compact the key space up to `revision`, waiting until it is applied (physical)."""
        async def fn(ch: grpc.aio.Channel, md: Metadata, t: float) -> None:
            await rpc.KVStub(ch).Compact(rpc.CompactionRequest(revision=revision, physical=True), timeout=t,
                                         metadata=md)
        await self.failover(fn, timeout)

    async def defragment(self, endpoint: str, timeout: float = DEFRAG_TIMEOUT) -> None:
        """Defragment one member: it answers nothing else until done, so the deadline is long."""
        async def fn(ch: grpc.aio.Channel, md: Metadata, t: float) -> None:
            await rpc.MaintenanceStub(ch).Defragment(rpc.DefragmentRequest(), timeout=t, metadata=md)
        await self.call(endpoint, fn, timeout, lane="long")

    async def alarm_disarm(self, member_id: int, kind: str, timeout: float | None = None) -> None:
        """Deactivate one member's alarm (`kind` NOSPACE or CORRUPT), as `etcdctl alarm disarm` does per alarm."""
        async def fn(ch: grpc.aio.Channel, md: Metadata, t: float) -> None:
            await rpc.MaintenanceStub(ch).Alarm(rpc.AlarmRequest(action=rpc.AlarmRequest.DEACTIVATE, memberID=member_id,
                                                                 alarm=rpc.AlarmType.Value(kind)),
                                                timeout=t, metadata=md)
        await self.failover(fn, timeout)

    async def move_leader(self, target_id: int, timeout: float | None = None) -> None:
        """Hand leadership to `target_id`; only the leader accepts it, so it is sent there first."""
        async def fn(ch: grpc.aio.Channel, md: Metadata, t: float) -> None:
            await rpc.MaintenanceStub(ch).MoveLeader(rpc.MoveLeaderRequest(targetID=target_id), timeout=t,
                                                     metadata=md)
        await self.failover(fn, timeout, first=await self.leader_urls(timeout))

    async def snapshot(self, endpoint: str, idle_timeout: float = SNAPSHOT_IDLE_TIMEOUT) -> SnapshotStream:
        """Open Maintenance.Snapshot on one member; read it with `async for`."""
        endpoint = dial(endpoint).url
        try:
            metadata = await asyncio.wait_for(self._metadata(endpoint, self.timeout), self.timeout + 0.5)
        except TimeoutError:
            timed_out = EtcdTimeout(f"no answer within {self.timeout:g}s", endpoint)
            self._drop(endpoint, "short", timed_out)
            raise timed_out from None
        except grpc.aio.AioRpcError as e:
            raise map_grpc_error(e, endpoint, self.timeout) from None
        call = rpc.MaintenanceStub(self._channel(endpoint, "long")).Snapshot(rpc.SnapshotRequest(), metadata=metadata)
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
            async with asyncio.timeout(timeout):  # not wait_for: no task per 32 KiB message (the receive loop's cost)
                resp = await self._call.read()
        except TimeoutError:
            silent = EtcdTimeout(f"snapshot stream silent for {timeout:g}s", self.endpoint)
            self.client._drop(self.endpoint, "long", silent)
            raise silent from None
        except grpc.aio.AioRpcError as e:
            err = map_grpc_error(e, self.endpoint, timeout)
            if isinstance(err, EtcdUnavailable):
                self.client._drop(self.endpoint, "long", err)
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


_LEADERLESS = ("etcdserver: leader changed", "etcdserver: no leader", "etcdserver: request timed out",
               "context deadline exceeded")


def _all_failed(failures: Iterable[BaseException]) -> EtcdUnavailable:
    errors = [e for e in failures if isinstance(e, EtcdError)]  # the races raise anything else at once
    by_reason: dict[str, list[str]] = {}
    for e in errors:
        by_reason.setdefault(e.message, []).append(e.endpoint or "?")
    reasons = "; ".join(f"{', '.join(sorted(eps))}: {msg}" for msg, eps in by_reason.items()) or "no endpoints"
    cls = EtcdTLSError if errors and all(isinstance(e, EtcdTLSError) for e in errors) else EtcdUnavailable
    return cls(f"no endpoint answered: {reasons}")


class ClusterSettings(Protocol):
    """What a client needs of a configured cluster (bot.config.ClusterConfig, above this layer)."""

    @property
    def endpoints(self) -> Sequence[str]: ...
    @property
    def cacert(self) -> Path | None: ...
    @property
    def cert(self) -> Path | None: ...
    @property
    def key(self) -> Path | None: ...
    @property
    def username(self) -> str | None: ...
    @property
    def password(self) -> str | None: ...
    @property
    def timeout_seconds(self) -> float: ...


def client_for(cluster: ClusterSettings) -> EtcdClient:
    """An EtcdClient for a configured cluster."""
    return EtcdClient(cluster.endpoints, tls=TLSFiles(cluster.cacert, cluster.cert, cluster.key),
                      username=cluster.username, password=cluster.password, timeout=cluster.timeout_seconds)


_REQUEST_ERRORS: tuple[tuple[str, type[EtcdRequestError]], ...] = (
    ("member not found", MemberNotFound),
    ("peer urls already exists", PeerURLExists),
    ("can only promote a learner member which is in sync", LearnerNotReady),
    ("learner member which is in sync", LearnerNotReady),
    ("can only promote a learner member", NotALearner),
    ("unhealthy cluster", UnhealthyCluster),
    ("not enough started members", UnhealthyCluster),
    ("too many learner members", TooManyLearners),
    ("rpc not supported for learner", LearnerUnsupported),
)


EXPIRED_TOKEN = ("invalid auth token", "auth token is expired")
TOKEN_APPLY_WAIT = 0.25  # a heartbeat or two: how long a member behind in applying may take to learn a new token
AUTH_MESSAGES = ("authentication failed", "permission denied", "invalid auth token", "user name is empty",
                  "user name not found", "auth token is expired")


def request_error(details: str, endpoint: str) -> EtcdError:
    low = details.lower()
    if any(m in low for m in AUTH_MESSAGES):
        return EtcdAuthError(details, endpoint)
    for needle, cls in _REQUEST_ERRORS:
        if needle in low:
            return cls(details, endpoint)
    return EtcdRequestError(details, endpoint)
