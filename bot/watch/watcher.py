"""The watch: per cluster a loop that, every `[clusters.watch] interval`, runs
the health fan-out once (`ctx.check`), asks every condition, and posts, edits
and resolves one message per open condition in the cluster's channels.

Every cluster has its own loop and each round its own deadline, so a cluster
that does not answer costs its own loop a deadline and nobody else anything.
Open alerts are kept in the store (table `alerts`), so a restarted bot edits
the messages it posted before instead of posting again.

Each round also reads every member's /metrics (its quota before etcd 3.6, and the counters
and histograms whose rates and percentiles the mixin's conditions judge, kept
over `[clusters.watch] window` in `ClusterWatch.history`), and the alerts
Alertmanager sent that still fire (bot/watch/alertmanager.py): their findings
are merged with the watch's own, one message per condition whoever saw it.
Any replica may receive a delivery; the leader's loop runs a round as soon as
the store shows a change (polled every POLL_SECONDS, or woken at once when
this replica received it). With the receiver on, a cluster whose watch is
disabled still gets a loop, which posts Alertmanager's alerts only (and reads
the cluster only while one fires or its message is open).

Probes: other figures a status answer lacks come from probes, each run at
most once per its `every_seconds`, their last results handed to the
conditions as `facts.extra[name]`. To add one: `register_probe(Probe(name, fetch, every))`,
where `await fetch(ctx, cluster, health)` returns the figure, or None when it
cannot tell this time (then it is asked again next round); it runs under
`timeout` (default twice the cluster's `timeout_seconds`), and a probe that
fails costs its own figure only.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from bot.config import ClusterConfig
from bot.domain.clock import Clock
from bot.domain.cluster import ClusterHealth, MemberMetrics, backend_quota
from bot.domain.errors import EtcdError
from bot.domain.record import AlertRecord, NewAlert, PlanRecord, ReceivedAlert
from bot.etcd.member_metrics import cluster_metrics
from bot.ops.context import BotContext
from bot.ops.notify import NotifyFailed
from bot.output import blocks
from bot.output.model import AlertView, short_duration
from bot.store.base import StoreError
from bot.watch import alertmanager, backups, certificates, launcher
from bot.watch.conditions import (
    CONDITIONS,
    LEADER_WINDOW,
    Evaluation,
    Facts,
    Finding,
    evaluate,
    expected,
    merge,
    runbook,
    title,
)
from bot.watch.readings import History
from bot.watch.tracker import FLAP_MIN, Act, Decision, Key, Track, Tracker

log = logging.getLogger(__name__)
T = TypeVar("T")
REFRESH_SECONDS = 60.0   # an open alert's message is edited when its figures change, and at least this often
POLL_SECONDS = 1.0       # how soon the leader sees Alertmanager's alerts another replica received
ALERTS_KEPT_SECONDS = 30 * 86400.0   # resolved alert rows older than this are deleted by the leader's housekeeping


# ---------------------------------------------------------------- probes

ProbeFn = Callable[[BotContext, ClusterConfig, ClusterHealth | None], Awaitable[Any]]


@dataclass(frozen=True)
class Probe:
    name: str
    fetch: ProbeFn
    every_seconds: float
    timeout: float | None = None   # seconds; None: twice the cluster's timeout_seconds


PROBES: dict[str, Probe] = {}


def register_probe(probe: Probe) -> Probe:
    PROBES[probe.name] = probe
    return probe


for _more in (certificates, backups):  # conditions with a probe of their own (importing them registers the conditions)
    register_probe(Probe(_more.PROBE, _more.fetch, _more.PROBE_EVERY))
register_probe(Probe(launcher.PROBE, launcher.fetch, launcher.PROBE_EVERY, launcher.PROBE_TIMEOUT))


# ---------------------------------------------------------------- per cluster state

@dataclass
class Posted:
    """One alert message in one channel."""

    id: int | None          # the store's row (None: the store refused it; kept in memory only)
    channel: str
    ts: str | None          # None: posting failed; tried again next round
    shown: str = ""         # what the message last showed (figures; not the ticking duration)
    at: float = 0.0         # when it was last edited


@dataclass
class ClusterWatch:
    tracker: Tracker
    history: History
    posted: dict[Key, list[Posted]] = field(default_factory=dict)
    quotas: dict[int, int] = field(default_factory=dict)                 # each member's quota, as last read
    attached: dict[str, set[Key]] = field(default_factory=dict)          # Alertmanager's etcdMembersDown: its keys
    firing: tuple[tuple[str, float], ...] = ()                           # the received alerts the last round saw
    probed: dict[str, tuple[float, Any]] = field(default_factory=dict)   # probe name -> (when, result)
    term: int | None = None                                              # the highest raft term seen
    elections: list[float] = field(default_factory=list)                 # when new terms were seen
    held: list[tuple[Track, str]] = field(default_factory=list)          # seen, not posted, and why (last round)
    failing: dict[tuple[str, str | None], str] = field(default_factory=dict)  # (condition, subject) -> error logged

    def leader_changes(self, health: ClusterHealth | None, now: float) -> int:
        """New raft terms (each an election) seen within LEADER_WINDOW."""
        terms = [h.status.raft_term for h in (health.members if health else ()) if h.status and h.status.leader]
        if terms:
            top = max(terms)
            if self.term is not None and top > self.term:
                self.elections += [now] * min(top - self.term, 100)
            self.term = max(top, self.term or 0)
        self.elections = [t for t in self.elections if now - t < LEADER_WINDOW]
        return len(self.elections)


class Watcher:
    """Watches every cluster whose watch is enabled, while `should_watch()` says so: by default
    while this replica holds the executor lease (with several replicas, only the leader watches;
    a single replica always leads)."""

    def __init__(self, ctx: BotContext, should_watch: Callable[[], bool] | None = None):
        self.ctx, self.clock = ctx, ctx.clock
        self.should_watch = should_watch or ctx.is_leader
        self.clusters: dict[str, ClusterWatch] = {}
        self.receiving = ctx.config.alertmanager.enabled
        self._wakes: dict[str, asyncio.Event] = {}

    async def run(self) -> None:
        """Forever: one loop per watched cluster (every cluster while Alertmanager's alerts are received), each a
        task named `watch <cluster>`."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.create_task(self._loop(c), name=f"watch {c.name}")
                               for c in self.ctx.config.clusters if c.watch.enabled or self.receiving))

    def received(self, cluster: str) -> None:
        """Alertmanager's alerts of `cluster` changed (this replica received them): a round now."""
        self._wakes.setdefault(cluster, asyncio.Event()).set()

    async def _loop(self, cluster: ClusterConfig) -> None:
        interval, clock = cluster.watch.interval_seconds, self.clock
        next_at = clock.monotonic()
        watching = False
        while True:
            try:
                if self.should_watch():
                    if not watching:   # (again): what the store says is open is ours to edit
                        self.clusters[cluster.name] = await self.load(cluster)
                        watching = True
                    await self.round(cluster)
                elif watching:   # another replica watches now: its gauges count, not ours
                    watching = False
                    self._gauges(cluster, [])
            except Exception:
                log.exception("watch round failed", extra={"ctx_cluster": cluster.name})
            next_at = max(next_at + interval, clock.monotonic())
            await self._pause(cluster, next_at, watching)

    async def _pause(self, cluster: ClusterConfig, until: float, watching: bool) -> None:
        """Until the next round is due (`until`, on the clock's monotonic time), or sooner while Alertmanager's
        alerts are received: when the cluster's change (woken by this replica's receiver, or seen in the store
        every POLL_SECONDS when another replica received them), or this replica becomes the one that watches
        (what others filed meanwhile is its to post)."""
        clock = self.clock
        if not self.receiving:
            await clock.sleep(until - clock.monotonic())
            return
        wake = self._wakes.setdefault(cluster.name, asyncio.Event())
        while True:
            left = until - clock.monotonic()
            if left <= 0:
                return
            if not await _woken(wake, clock, min(left, POLL_SECONDS)):
                if not (self.should_watch() and (not watching or await self._alerts_changed(cluster))):
                    continue
            wake.clear()
            return

    async def _alerts_changed(self, cluster: ClusterConfig) -> bool:
        state = self.clusters.get(cluster.name)
        rows = await self._quiet(self.ctx.store.received_alerts(cluster.name), None)
        return state is not None and rows is not None and _firing(rows) != state.firing

    async def load(self, cluster: ClusterConfig) -> ClusterWatch:
        """The cluster's open alerts from the store: their messages are edited, not posted again."""
        watch = cluster.watch
        state = ClusterWatch(Tracker(watch.grace_seconds, jitter=min(1.0, watch.interval_seconds / 10)),
                             History(watch.window_seconds, watch.growth_horizon_seconds))
        for row in await self.ctx.store.open_alerts(cluster.name):
            finding = Finding.from_json({**json.loads(row.detail or "{}"), "kind": row.condition,
                                         "subject": row.subject})
            if finding.key not in state.tracker.tracks:
                state.tracker.restore(finding, row.opened_at, row.flaps)
            state.posted.setdefault(finding.key, []).append(
                Posted(row.id, row.channel or "", row.message_ts))   # edited in the first round: watched again
        return state

    # ---------------------------------------------------------------- one round

    async def facts(self, cluster: ClusterConfig, state: ClusterWatch) -> Facts:
        now = self.clock.now()
        health, error = await self._health(cluster)
        metrics: dict[int, MemberMetrics] = {}
        if cluster.watch.enabled:
            await self._probe(cluster, state, health, now)
            metrics = await self._metrics(cluster, health)
            for h in health.members if health else ():
                quota, _ = backend_quota(h.status, metrics.get(h.member.id))
                if quota:
                    state.quotas[h.member.id] = quota
            state.history.add(now, metrics, {h.member.id: h.status.db_size for h in (health.members if health else ())
                                             if h.status is not None})
        extra = {name: value for name, (_, value) in state.probed.items()}
        newest = await self._quiet(self.ctx.store.snapshots(cluster.name, limit=1), [])
        return Facts(cluster=cluster, now=now, health=health, error=error, quotas=dict(state.quotas),
                     newest_snapshot=newest[0] if newest else None,
                     leader_changes=state.leader_changes(health, now), extra=extra, metrics=metrics,
                     windows=state.history.windows(), sizes=state.history.growth())

    async def _metrics(self, cluster: ClusterConfig, health: ClusterHealth | None) -> dict[int, MemberMetrics]:
        """Every answering member's /metrics this round (a member that does not answer is left out)."""
        if health is None:
            return {}
        try:
            found = await asyncio.wait_for(cluster_metrics(self.ctx.client(cluster), health),
                                           2 * cluster.timeout_seconds)
        except TimeoutError:
            return {}
        return {mid: m for mid, m in found.items() if not isinstance(m, str)}

    async def _alerts(self, cluster: ClusterConfig, state: ClusterWatch, facts: Facts) -> list[Finding] | None:
        """Alertmanager's alerts that fire for the cluster, as findings; None when the store cannot say (the
        alerts they opened then stand still)."""
        if not self.receiving:
            return []
        rows = await self._quiet(self.ctx.store.received_alerts(cluster.name), None)
        if rows is None:
            return None
        state.firing = _firing(rows)
        alive = {a.fingerprint for a in rows}
        state.attached = {k: v for k, v in state.attached.items() if k in alive}
        return alertmanager.findings(facts, rows, state.attached)

    async def round(self, cluster: ClusterConfig) -> list[Decision]:
        state = self.clusters.get(cluster.name) or self.clusters.setdefault(cluster.name, await self.load(cluster))
        if not cluster.watch.enabled and not state.tracker.tracks and not await self._alerts_changed(cluster):
            return []   # its own checks are off, and Alertmanager says nothing: no status fan-out for nothing
        facts = await self.facts(cluster, state)
        verdicts = evaluate(facts) if cluster.watch.enabled else Evaluation()
        self._report(cluster, state, [(f.key, f.error) for f in verdicts.failures], within=CONDITIONS)
        alerted = await self._alerts(cluster, state, facts)
        unknown = set(verdicts.unknown)
        if alerted is None:   # what Alertmanager alone saw stands still
            unknown |= {t.finding.kind for t in state.tracker.tracks.values() if not t.finding.watched}
        findings = merge([*verdicts.findings, *(alerted or [])])
        plan: PlanRecord | None = await self._quiet(self.ctx.store.open_plan(cluster.name), None)
        mutes = await self._quiet(self.ctx.store.mutes(), [])
        muted = any(m.cluster == cluster.name for m in mutes)
        decisions = state.tracker.step(findings, unknown, facts.now,
                                       postable=lambda f: not muted and not expected(plan, f), unsure=verdicts.unsure)
        state.held = [(t, _why_held(t.finding, muted, plan, cluster)) for t in state.tracker.tracks.values()
                      if not t.open and t.present_since is not None]
        log.debug("watch round", extra={"ctx_cluster": cluster.name,
                                        "ctx_seconds": round(self.clock.now() - facts.now, 3),
                                        "ctx_findings": [(*f.key, *f.sources) for f in findings],
                                        "ctx_unknown": sorted(verdicts.unknown),
                                        "ctx_plan": plan and f"{plan.id} {plan.kind} {plan.state}", "ctx_muted": muted})
        for d in decisions:
            await self._act(cluster, state, d, facts.now)
        self._gauges(cluster, state.tracker.open_tracks())
        self.ctx.metrics.watch_rounds.labels(cluster=cluster.name).inc()
        return decisions

    def held(self, cluster: str, now: float) -> list[AlertView] | None:
        """What the last round saw of `cluster` and did not post, and why (`/etcd alerts` shows it);
        None when this replica does not watch."""
        config, state = self.ctx.config.cluster(cluster), self.clusters.get(cluster)
        if not self.should_watch():
            return None
        if config is None or state is None:
            return []
        return [replace(self.view(config, t, now), opened_at=t.present_since or now, resolved_at=None, held=why)
                for t, why in state.held]

    def _report(self, cluster: ClusterConfig, state: ClusterWatch,
                failures: list[tuple[tuple[str, str | None], Exception]], within: Collection[str]) -> None:
        """Count every failure of a condition (or a probe) and log each once, with its traceback, until it
        changes or goes away: a check that fails every round must not flood the log, nor go unnoticed.
        `within`: the conditions (or probes) that were asked, whose earlier failures this round settles."""
        now = {key: f"{type(e).__name__}: {e}" for key, e in failures}
        for key, e in failures:
            self.ctx.metrics.watch_errors.labels(cluster=cluster.name, condition=key[0]).inc()
            if state.failing.get(key) != now[key]:
                log.error("watch: check failed; it counts as unknown until it works again",
                          exc_info=(type(e), e, e.__traceback__),
                          extra={"ctx_cluster": cluster.name, "ctx_condition": key[0], "ctx_subject": key[1]})
        for key in [k for k in state.failing if k[0] in within and k not in now]:
            log.info("watch: check works again", extra={"ctx_cluster": cluster.name, "ctx_condition": key[0],
                                                        "ctx_subject": key[1]})
            del state.failing[key]
        state.failing.update(now)

    def _gauges(self, cluster: ClusterConfig, open_tracks: list[Track]) -> None:
        for kind in CONDITIONS:
            self.ctx.metrics.alerts_open.labels(cluster=cluster.name, condition=kind).set(
                sum(1 for t in open_tracks if t.finding.kind == kind))

    async def _health(self, cluster: ClusterConfig) -> tuple[ClusterHealth | None, str | None]:
        """One status fan-out. Its calls have their own deadlines (member list, then statuses);
        this one is a safety net that also allows for the membership's write to the store."""
        deadline = 2 * cluster.timeout_seconds + 3 * self.ctx.config.database_timeout_seconds + 1.0
        try:
            return await asyncio.wait_for(self.ctx.check(cluster), deadline), None
        except EtcdError as e:
            return None, str(e)
        except TimeoutError:
            return None, f"no answer within {deadline:g}s"

    async def _probe(self, cluster: ClusterConfig, state: ClusterWatch, health: ClusterHealth | None,
                     now: float) -> None:
        due = [p for p in PROBES.values()
               if p.name not in state.probed or now - state.probed[p.name][0] >= p.every_seconds]

        bugs: list[tuple[tuple[str, str | None], Exception]] = []

        async def one(probe: Probe) -> None:
            try:
                value = await asyncio.wait_for(probe.fetch(self.ctx, cluster, health),
                                               probe.timeout or 2 * cluster.timeout_seconds)
            except (EtcdError, TimeoutError, OSError) as e:   # asked again next round
                log.info("watch probe failed", extra={"ctx_cluster": cluster.name, "ctx_probe": probe.name,
                                                      "ctx_error": str(e) or type(e).__name__})
                return
            except Exception as e:   # a probe's bug costs its own figure, not the round
                bugs.append(((_probe_label(probe), None), e))
                return
            if value is not None:
                state.probed[probe.name] = (now, value)
        await asyncio.gather(*(one(p) for p in due))
        self._report(cluster, state, bugs, within=[_probe_label(p) for p in due])

    async def _quiet(self, call: Awaitable[Any], default: Any) -> Any:
        """A store read the round can do without (it logs and goes on)."""
        try:
            return await call
        except StoreError as e:
            log.warning("watch: state store unavailable", extra={"ctx_error": str(e)})
            return default

    # ---------------------------------------------------------------- messages

    def view(self, cluster: ClusterConfig, track: Track, now: float) -> AlertView:
        f = track.finding
        return replace(alert_view(cluster.name, f, track.opened_at or now, now, track.flaps),
                       resolved_at=track.resolved_at, flapping=track.flapping)

    async def _act(self, cluster: ClusterConfig, state: ClusterWatch, d: Decision, now: float) -> None:
        track, store, notifier = d.track, self.ctx.store, self.ctx.notifier
        key = track.finding.key
        view = self.view(cluster, track, now)
        reply = blocks.alert_reply(view)
        shown = _shown(track.finding, track.flaps)
        detail = json.dumps(track.finding.to_json(), separators=(",", ":"))
        if d.act == Act.OPEN:
            self.ctx.metrics.alerts_posted.labels(cluster=cluster.name, condition=track.finding.kind).inc()
            log.warning("watch: condition open", extra={"ctx_cluster": cluster.name, "ctx_condition": key[0],
                                                        "ctx_subject": key[1]})
            rows = state.posted[key] = []
            for channel in cluster.channels:
                alert = NewAlert(cluster=cluster.name, condition=key[0], subject=key[1], opened_at=view.opened_at,
                                 updated_at=now, channel=channel, message_ts=None, detail=detail, flaps=track.flaps)
                rows.append(await _whole(self._open(channel, alert, reply, shown, now)))
            return
        rows = state.posted.get(key, [])
        for p in rows:
            if p.ts is None:   # the first post failed: try again
                p.ts = await self._post(p.channel, reply)
                changed: dict[str, Any] = {"message_ts": p.ts} if p.ts else {}
            elif d.act != Act.UPDATE or shown != p.shown or now - p.at >= REFRESH_SECONDS:
                await notifier.update_message(p.channel, p.ts, reply)
                changed = {}
            else:
                continue
            if d.act in (Act.RESOLVE, Act.REOPEN) and p.ts:
                await notifier.thread_message(p.channel, p.ts, blocks.alert_note(view))
            p.shown, p.at = shown, now
            changed.update(updated_at=now, detail=detail, flaps=track.flaps)
            if d.act == Act.RESOLVE:
                changed.update(state="resolved", resolved_at=track.resolved_at)
            elif d.act == Act.REOPEN:
                changed.update(state="open", resolved_at=None)
            if p.id is not None:
                await self._quiet(store.update_alert(p.id, **changed), None)
        if d.act == Act.RESOLVE:
            log.info("watch: condition resolved", extra={"ctx_cluster": cluster.name, "ctx_condition": key[0],
                                                         "ctx_subject": key[1]})

    async def _open(self, channel: str, alert: NewAlert, reply: blocks.Reply, shown: str, now: float) -> Posted:
        """Post an alert and record its message: the record is what a restarted bot edits instead of posting
        the alert again."""
        ts = await self._post(channel, reply)
        row = await self._quiet(self.ctx.store.open_alert(replace(alert, message_ts=ts)), None)
        return Posted(row, channel, ts, shown, now)

    async def _post(self, channel: str, reply: blocks.Reply) -> str | None:
        try:
            return await self.ctx.notifier.channel_message(channel, reply)
        except NotifyFailed as e:
            log.warning("watch: alert not posted", extra={"ctx_channel": channel, "ctx_error": str(e)})
            return None


async def _woken(event: asyncio.Event, clock: Clock, seconds: float) -> bool:
    """Whether `event` was set within `seconds` on `clock` (the sleep keeps the waiting task's name, which
    bot.testing.clock.ManualClock shows)."""
    if event.is_set():
        return True
    loop, current = asyncio.get_running_loop(), asyncio.current_task()
    waiter = loop.create_task(event.wait())
    sleeper = loop.create_task(clock.sleep(seconds), name=current.get_name() if current else None)
    try:
        await asyncio.wait({waiter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        sleeper.cancel()
    return event.is_set()


async def _whole(work: Coroutine[Any, Any, T]) -> T:
    """Run `work` to its end even when the caller is cancelled (a replica stopping mid-round): a message
    posted and not recorded would be posted again by the next leader. The caller's cancellation is raised
    once the work is done (each call in it has its own deadline)."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


def _probe_label(probe: Probe) -> str:
    """How a probe's failures are logged and counted beside the conditions'."""
    return f"{probe.name} probe"


def _why_held(finding: Finding, muted: bool, plan: PlanRecord | None, cluster: ClusterConfig) -> str:
    if muted:
        return "muted"
    if plan is not None and expected(plan, finding):
        return f"the bot's own {plan.kind} plan {plan.id} ({plan.state}) causes it"
    return f"it has not lasted its {short_duration(cluster.watch.grace_seconds)} grace yet"


def _shown(finding: Finding, flaps: int) -> str:
    return json.dumps([finding.to_json(), flaps], separators=(",", ":"))


def alert_view(cluster: str, f: Finding, opened_at: float, now: float, flaps: int) -> AlertView:
    return AlertView(cluster=cluster, condition=f.kind, title=title(f.kind), subject=f.subject, summary=f.summary,
                     figures=f.figures, suggestions=f.suggestions, opened_at=opened_at, now=now, flaps=flaps,
                     flapping=flaps >= FLAP_MIN, severity=f.severity, sources=f.sources, links=f.links,
                     offers=f.offers, runbook_url=runbook(f.kind))


def open_views(cluster: str, rows: list[AlertRecord], now: float) -> list[AlertView]:
    """The open alerts in the store as views, one per condition (a row is one channel's message)."""
    views: dict[tuple[str, str], AlertView] = {}
    for row in rows:
        f = Finding.from_json({**json.loads(row.detail or "{}"), "kind": row.condition, "subject": row.subject})
        views.setdefault(f.key, alert_view(cluster, f, row.opened_at, now, row.flaps))
    return list(views.values())


def _firing(alerts: list[ReceivedAlert]) -> tuple[tuple[str, float], ...]:
    return tuple(sorted((a.fingerprint, a.starts_at) for a in alerts))


async def tidy_alerts(ctx: BotContext, now: float | None = None) -> tuple[int, int]:
    """The leader's housekeeping of the alert rows: open alerts of clusters the bot no longer watches
    (gone from the config, or their watch disabled; the config is read at start, so in effect at
    start-up) are closed without posting: nobody would ever resolve them. Alerts resolved more than
    ALERTS_KEPT_SECONDS ago are deleted. Returns (closed, deleted)."""
    now = ctx.clock.now() if now is None else now
    receiving = ctx.config.alertmanager.enabled
    closed = await ctx.store.close_alerts([c.name for c in ctx.config.clusters if c.watch.enabled or receiving], now)
    deleted = await ctx.store.prune_alerts(now - ALERTS_KEPT_SECONDS)
    await ctx.store.prune_received(now - ALERTS_KEPT_SECONDS)
    if closed or deleted:
        log.info("alert rows tidied", extra={"ctx_closed": closed, "ctx_deleted": deleted})
    return closed, deleted
