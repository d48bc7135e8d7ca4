"""The certificate condition: members' serving certificates read in the TLS handshake (client and peer URLs),
and the warning threshold."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from bot.config import ConfigError, load_config, parse_config
from bot.domain.cluster import Member, TLSFiles
from bot.etcd.certs import DAY, CertReading, Kind, ServingCert, expiring, parse_der, read_certs, remaining, tls_urls
from bot.ops.context import BotContext
from bot.ops.notify import PlainDirectory, PlainNotifier
from bot.testing import certs
from bot.testing.clock import ManualClock
from bot.testing.slack import Message
from bot.testing.workspace import cluster_table, write_config
from bot.watch.certificates import PROBE, certificate
from bot.watch.certificates import fetch as fetch_certs
from bot.watch.conditions import Facts
from helpers import advance_until, text_of, watching

NOW = 1_000_000.0


def reading(member: str, days: float | None, kind: Kind = "peer") -> CertReading:
    url = f"https://10.0.0.1:{2380 if kind == 'peer' else 2379}"
    if days is None:
        return CertReading(member, kind, url, error="no TLS handshake within 2s", at=NOW)
    return CertReading(member, kind, url, cert=ServingCert(NOW + days * DAY, "CN=etcd-member"), at=NOW)


# ---------------------------------------------------------------- pure

def test_only_certificates_within_the_warning_are_expiring_soonest_first() -> None:
    readings = [reading("m1", 90), reading("m2", 3, "client"), reading("m3", 13.9), reading("m4", -1),
                reading("m5", None), reading("m6", 14.1)]
    found = expiring(readings, NOW, 14 * DAY)
    assert [(r.member, r.kind) for r in found] == [("m4", "peer"), ("m2", "client"), ("m3", "peer")]
    assert expiring(readings, NOW, 0) == [readings[3]]  # only the expired one


def test_the_margin_reads_as_people_say_it() -> None:
    cert = ServingCert(NOW + 3 * DAY + 600, "CN=x")
    assert remaining(cert, NOW) == "in 3 days"
    assert remaining(cert, NOW + 600) == "in 3 days"
    assert remaining(cert, NOW + 1.5 * DAY) == "in 36 hours"
    assert remaining(cert, NOW + 3 * DAY) == "in less than an hour"
    assert remaining(cert, NOW + 3 * DAY + 4200) == "1 hour ago"
    assert remaining(cert, NOW + 6 * DAY) == "3 days ago"
    assert cert.expires == "1970-01-15 13:56 UTC"


def test_only_https_urls_are_probed_peer_and_client() -> None:
    members = [Member(1, "m1", ("https://10.0.0.1:2380",), ("https://10.0.0.1:2379", "http://10.0.0.1:4001")),
               Member(2, "", ("https://10.0.0.2:2380",), ()),  # added, not started: its peer URL serves later
               Member(3, "m3", ("http://10.0.0.3:2380",), ("http://10.0.0.3:2379",))]
    assert tls_urls(members) == [("m1", "client", "https://10.0.0.1:2379"), ("m1", "peer", "https://10.0.0.1:2380"),
                                 ("0000000000000002", "peer", "https://10.0.0.2:2380")]


def test_a_certificate_is_parsed_for_its_expiry_subject_and_names(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    files = certs.generate(tmp_path, hosts=("127.0.0.1", "etcd-1.example"), valid_days=3)
    pem = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    cert = parse_der(pem.public_bytes(serialization.Encoding.DER))
    assert 3 * DAY - 120 < cert.seconds_left(time.time()) <= 3 * DAY
    assert cert.subject == "CN=etcd-member"
    assert set(cert.sans) == {"127.0.0.1", "etcd-1.example"}


# ---------------------------------------------------------------- real members

async def test_every_members_client_and_peer_certificate_is_read_and_a_silent_one_costs_one_deadline(
        make_cluster) -> None:
    c = make_cluster(3, tls=True, cert_days=3)
    members = [Member(i, name, (m.peer_url,), (m.client_url,)) for i, (name, m) in enumerate(c.members.items(), 1)]
    files = c.tls_files()
    c.pause("member3")
    try:
        started = time.monotonic()
        readings = await read_certs(tls_urls(members), files, timeout=1.0, now=time.time())
        elapsed = time.monotonic() - started
    finally:
        c.resume("member3")
    by = {(r.member, r.kind): r for r in readings}
    assert set(by) == {(f"member{i}", k) for i in (1, 2, 3) for k in ("client", "peer")}
    for i in (1, 2):
        for kind in ("client", "peer"):
            cert = by[(f"member{i}", kind)].cert
            assert cert is not None, by[(f"member{i}", kind)].error
            assert 2.9 * DAY < cert.seconds_left(time.time()) <= 3 * DAY and "127.0.0.1" in cert.sans
    assert by[("member3", "peer")].cert is None and "no TLS handshake within 1s" in str(by[("member3", "peer")].error)
    assert elapsed < 2.5, f"the black-holed member cost {elapsed:.1f}s: its URLs are asked at once, under one deadline"
    # peer URLs demand a client certificate: without the configured one, the reading says so
    no_client_cert = await read_certs([("member1", "peer", c.member("member1").peer_url)], TLSFiles(), 2.0, time.time())
    assert no_client_cert[0].cert is None and "client certificate" in str(no_client_cert[0].error)
    assert len(expiring(readings, time.time(), 14 * DAY)) == 4


# ---------------------------------------------------------------- the condition

def facts(readings: list[CertReading] | None, warning: str = "14d") -> Facts:
    config = parse_config({"clusters": [{"name": "prod", "endpoints": ["https://10.0.0.1:2379"],
                                         "watch": {"cert_warning": warning}}]}, Path("."))
    return Facts(cluster=config.clusters[0], now=NOW, health=None,
                 extra={} if readings is None else {PROBE: readings})


def test_one_alert_lists_every_certificate_expiring_soonest_first() -> None:
    [found] = certificate(facts([reading("m1", 90), reading("m2", 10, "client"), reading("m3", 3)])) or []
    assert found.key == ("certificate", "serving certificates")
    assert found.summary.startswith("m3's peer certificate expires 1970-01-15 13:46 UTC (in 3 days): renew it")
    assert "1 more within 14 days" in found.summary
    assert [name for name, _ in found.figures] == ["m3 peer https://10.0.0.1:2380", "m2 client https://10.0.0.1:2379"]
    assert "CN=etcd-member" in found.figures[0][1] and found.members == ("m3", "m2")
    assert found.suggestions == ()  # renewing is no /etcd command


def test_the_warning_is_configurable_and_nothing_is_said_before_the_first_probe() -> None:
    assert certificate(facts([reading("m1", 10)], warning="7d")) == []
    [expired] = certificate(facts([reading("m1", -2)], warning="7d")) or []
    assert expired.summary == "m1's peer certificate expired 1970-01-10 13:46 UTC (2 days ago): its peers refuse it"
    assert certificate(facts(None)) is None
    assert certificate(facts([reading("m1", None)])) == []


async def test_a_cluster_with_certificates_valid_for_3_days_raises_the_certificate_condition(
        make_cluster, slack, start_bot) -> None:
    short, year = make_cluster(3, tls=True, cert_days=3), make_cluster(1, tls=True)
    fast = {"interval": "1s", "grace": "1s"}
    clock = ManualClock()
    bot = await start_bot([cluster_table("short-lived", short, watch=fast), cluster_table("renewed", year, watch=fast)],
                          clock=clock)
    await watching(bot.runtime.watcher, clock)
    from cryptography import x509
    expiry = x509.load_pem_x509_certificate(Path(short.tls.server_cert).read_bytes()).not_valid_after_utc

    def alerts() -> list[Message]:
        return [m for m in slack.messages if m.thread_ts is None and "CERTIFICATE" in text_of(m)]

    [msg], _ = await advance_until(clock, alerts, 2, "certificate alert")   # first seen, then its grace
    shown = text_of(msg)
    assert "short-lived" in shown and f"expires {expiry:%Y-%m-%d %H:%M} UTC (in 3 days)" in shown, shown
    for name in ("member1", "member2", "member3"):
        for kind, url in (("peer", short.member(name).peer_url), ("client", short.member(name).client_url)):
            assert f"{name} {kind} {url}" in shown, shown
    assert "5 more within 14 days" in shown and "CN=etcd-member" in shown and "127.0.0.1" in shown
    for _ in range(3):   # several more rounds: still the one message, and none for the renewed cluster
        await clock.advance(1)
    assert alerts() == [msg], [text_of(m) for m in alerts()]


def test_cert_warning_is_a_duration() -> None:
    assert facts([], warning="7d").cluster.watch.cert_warning_seconds == 7 * DAY
    assert parse_config({"clusters": [{"name": "p", "endpoints": ["https://10.0.0.1:2379"]}]},
                        Path(".")).clusters[0].watch.cert_warning_seconds == 14 * DAY
    with pytest.raises(ConfigError, match=r"^clusters\[0\]\.watch\.cert_warning: 'soon' is not a duration"):
        facts([], warning="soon")


async def test_the_probe_keeps_a_silent_urls_last_reading_and_waits_for_an_answering_cluster(
        make_cluster, tmp_path) -> None:
    c = make_cluster(1, tls=True, cert_days=3)
    ctx = await BotContext.open(load_config(write_config(tmp_path, [cluster_table("p", c)])), PlainNotifier(),
                                PlainDirectory())
    try:
        cluster = ctx.config.clusters[0]
        health = await ctx.check(cluster)
        first = await fetch_certs(ctx, cluster, health) or []
        assert [(r.kind, r.cert is not None) for r in first] == [("client", True), ("peer", True)]
        c.pause("member1")
        try:
            assert await fetch_certs(ctx, cluster, health) == first  # silent now: the last readings stand
        finally:
            c.resume("member1")
        assert await fetch_certs(ctx, cluster, None) is None  # no member list: asked again next round
    finally:
        await ctx.close()
